//! Message framing of the simple targets: `raw` (the null relay), `nats` (NATS text protocol)
//! and `mqtt` (MQTT 3.1.1, QoS 0). Encoders append to a buffer; [`parse`] reads one item off
//! the front of a buffer without copying.

use anyhow::{bail, Result};
use bytes::{BufMut, BytesMut};

use crate::nullrelay;

/// The protocol spoken to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// 16-octet hello, then u32 BE length-prefixed frames (the null relay).
    Raw,
    /// NATS text protocol.
    Nats,
    /// MQTT 3.1.1, QoS 0.
    Mqtt,
}

impl Proto {
    /// The name used in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Nats => "nats",
            Self::Mqtt => "mqtt",
        }
    }
}

/// One thing read from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Item {
    /// A delivered message; its payload is `buf[start..end]`.
    Msg { start: usize, end: usize },
    /// NATS `PING`: answer `PONG`.
    Ping,
    /// NATS `PONG`.
    Pong,
    /// MQTT CONNACK, accepted.
    ConnAck,
    /// MQTT SUBACK, granted.
    SubAck,
    /// Anything else that needs no action (`INFO`, `+OK`, MQTT PINGRESP ...).
    Other,
}

/// The channel name of channel `i`: `load.i` (NATS) or `load/i` (MQTT).
pub(crate) fn subject(proto: Proto, channel: usize) -> String {
    match proto {
        Proto::Mqtt => format!("load/{channel}"),
        _ => format!("load.{channel}"),
    }
}

/// What a sender sends first; its connection is ready once it has seen what [`handshake_done`]
/// waits for.
pub(crate) fn sender_hello(out: &mut BytesMut, proto: Proto, channel: usize, client_id: &str) {
    match proto {
        Proto::Raw => out.put_slice(&nullrelay::hello(b'S', channel as u32)),
        Proto::Nats => {
            out.put_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n");
        }
        Proto::Mqtt => mqtt_connect(out, client_id),
    }
}

/// What a receiver sends first: hello and subscription.
pub(crate) fn receiver_hello(out: &mut BytesMut, proto: Proto, channel: usize, client_id: &str) {
    match proto {
        Proto::Raw => out.put_slice(&nullrelay::hello(b'R', channel as u32)),
        Proto::Nats => {
            out.put_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB ");
            out.put_slice(subject(proto, channel).as_bytes());
            // The PONG proves the SUB is in place before any sender starts.
            out.put_slice(b" 1\r\nPING\r\n");
        }
        Proto::Mqtt => {
            mqtt_connect(out, client_id);
            let topic = subject(proto, channel);
            out.put_u8(0x82);
            put_varint(out, 2 + 2 + topic.len() + 1);
            out.put_u16(1);
            put_str(out, &topic);
            out.put_u8(0);
        }
    }
}

/// The item that completes the handshake of a sender (`None`: nothing to wait for).
pub(crate) fn sender_ready_on(proto: Proto) -> Option<Item> {
    match proto {
        Proto::Raw => None,
        Proto::Nats => Some(Item::Pong),
        Proto::Mqtt => Some(Item::ConnAck),
    }
}

/// The item that completes the handshake of a receiver (`None`: nothing to wait for).
pub(crate) fn receiver_ready_on(proto: Proto) -> Option<Item> {
    match proto {
        Proto::Raw => None,
        Proto::Nats => Some(Item::Pong),
        Proto::Mqtt => Some(Item::SubAck),
    }
}

/// True when `item` is what the handshake waits for.
pub(crate) fn handshake_done(want: Option<Item>, item: Item) -> bool {
    want == Some(item)
}

/// Frame header placed before a payload of `len` octets on channel `topic`.
pub(crate) fn frame_head(out: &mut BytesMut, proto: Proto, topic: &str, len: usize) {
    match proto {
        Proto::Raw => out.put_u32(len as u32),
        Proto::Nats => {
            out.put_slice(b"PUB ");
            out.put_slice(topic.as_bytes());
            out.put_u8(b' ');
            out.put_slice(len.to_string().as_bytes());
            out.put_slice(b"\r\n");
        }
        Proto::Mqtt => {
            out.put_u8(0x30);
            put_varint(out, 2 + topic.len() + len);
            put_str(out, topic);
        }
    }
}

/// Frame trailer after the payload.
pub(crate) fn frame_tail(out: &mut BytesMut, proto: Proto) {
    if proto == Proto::Nats {
        out.put_slice(b"\r\n");
    }
}

/// What a clean goodbye looks like (sent by senders once done).
pub(crate) fn goodbye(out: &mut BytesMut, proto: Proto) {
    match proto {
        Proto::Raw => {}
        // The PONG to this PING shows the server has read every PUB before it.
        Proto::Nats => out.put_slice(b"PING\r\n"),
        Proto::Mqtt => out.put_slice(&[0xE0, 0x00]),
    }
}

/// Reads one item off the front of `buf`: `Ok(None)` when more input is needed, otherwise the
/// item and the octets it used.
pub(crate) fn parse(proto: Proto, buf: &[u8]) -> Result<Option<(Item, usize)>> {
    match proto {
        Proto::Raw => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                return Ok(None);
            }
            Ok(Some((
                Item::Msg {
                    start: 4,
                    end: 4 + len,
                },
                4 + len,
            )))
        }
        Proto::Nats => parse_nats(buf),
        Proto::Mqtt => parse_mqtt(buf),
    }
}

fn parse_nats(buf: &[u8]) -> Result<Option<(Item, usize)>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 64 * 1024 {
            bail!("NATS line longer than 64 KiB");
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let after = eol + 2;
    if line.starts_with(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let Some(count) = line.rsplit(|b| *b == b' ').next() else {
            bail!("bad NATS MSG line");
        };
        let n: usize = std::str::from_utf8(count)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!("bad NATS MSG line '{}'", String::from_utf8_lossy(line))
            })?;
        if buf.len() < after + n + 2 {
            return Ok(None);
        }
        if &buf[after + n..after + n + 2] != b"\r\n" {
            bail!("NATS MSG payload not followed by CRLF");
        }
        return Ok(Some((
            Item::Msg {
                start: after,
                end: after + n,
            },
            after + n + 2,
        )));
    }
    let item = if line == b"PING" {
        Item::Ping
    } else if line == b"PONG" {
        Item::Pong
    } else if line.starts_with(b"-ERR") {
        bail!("NATS server error: {}", String::from_utf8_lossy(line));
    } else {
        Item::Other
    };
    Ok(Some((item, after)))
}

fn parse_mqtt(buf: &[u8]) -> Result<Option<(Item, usize)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let kind = buf[0] >> 4;
    let Some((len, used)) = get_varint(&buf[1..])? else {
        return Ok(None);
    };
    let body_at = 1 + used;
    let total = body_at + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[body_at..total];
    let item = match kind {
        2 => {
            if body.len() < 2 || body[1] != 0 {
                bail!("MQTT connection refused (CONNACK {body:?})");
            }
            Item::ConnAck
        }
        3 => {
            let qos = (buf[0] >> 1) & 3;
            if body.len() < 2 {
                bail!("MQTT PUBLISH too short");
            }
            let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let mut start = body_at + 2 + tlen;
            if qos > 0 {
                start += 2;
            }
            if start > total {
                bail!("MQTT PUBLISH topic overruns the packet");
            }
            Item::Msg { start, end: total }
        }
        9 => {
            if body.len() < 3 || body[2] & 0x80 != 0 {
                bail!("MQTT subscription refused (SUBACK {body:?})");
            }
            Item::SubAck
        }
        _ => Item::Other,
    };
    Ok(Some((item, total)))
}

fn mqtt_connect(out: &mut BytesMut, client_id: &str) {
    out.put_u8(0x10);
    put_varint(out, 10 + 2 + client_id.len());
    put_str(out, "MQTT");
    out.put_u8(4); // protocol level 3.1.1
    out.put_u8(0x02); // clean session
    out.put_u16(0); // keep-alive off
    put_str(out, client_id);
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

/// MQTT remaining length: (value, octets used), `None` when incomplete.
fn get_varint(buf: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    bail!("bad MQTT remaining length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(proto: Proto, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        frame_head(&mut out, proto, &subject(proto, 3), payload.len());
        out.put_slice(payload);
        frame_tail(&mut out, proto);
        out
    }

    #[test]
    fn raw_and_mqtt_frames_parse_back() {
        for proto in [Proto::Raw, Proto::Mqtt] {
            for len in [0usize, 5, 127, 128, 4096, 20_000] {
                let payload = vec![b'x'; len];
                let f = framed(proto, &payload);
                assert_eq!(parse(proto, &f[..f.len() - 1]).unwrap(), None);
                let (item, used) = parse(proto, &f).unwrap().unwrap();
                assert_eq!(used, f.len());
                let Item::Msg { start, end } = item else {
                    panic!("{item:?}")
                };
                assert_eq!(&f[start..end], &payload[..]);
            }
        }
    }

    #[test]
    fn nats_lines() {
        let f = framed(Proto::Nats, b"hi");
        assert_eq!(&f[..], b"PUB load.3 2\r\nhi\r\n");
        let buf = b"INFO {}\r\nPING\r\nMSG load.3 1 5\r\nhello\r\nMSG a 1 r 2\r\nab\r\nPONG\r\nMSG x 1 3\r\nab";
        let mut at = 0;
        let mut items = Vec::new();
        while let Some((item, used)) = parse(Proto::Nats, &buf[at..]).unwrap() {
            if let Item::Msg { start, end } = item {
                items.push(String::from_utf8_lossy(&buf[at + start..at + end]).into_owned());
            } else {
                items.push(format!("{item:?}"));
            }
            at += used;
        }
        assert_eq!(items, ["Other", "Ping", "hello", "ab", "Pong"]);
        assert!(parse(Proto::Nats, b"-ERR 'x'\r\n").is_err());
    }

    #[test]
    fn mqtt_handshake_packets() {
        let mut out = BytesMut::new();
        receiver_hello(&mut out, Proto::Mqtt, 2, "c");
        // CONNECT: 0x10, len 13, "MQTT", level 4, flags, keep-alive, id.
        assert_eq!(&out[..15], b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c");
        assert_eq!(&out[15..], b"\x82\x0b\x00\x01\x00\x06load/2\x00");
        assert_eq!(
            parse(Proto::Mqtt, &[0x20, 2, 0, 0]).unwrap(),
            Some((Item::ConnAck, 4))
        );
        assert!(parse(Proto::Mqtt, &[0x20, 2, 0, 5]).is_err());
        assert_eq!(
            parse(Proto::Mqtt, &[0x90, 3, 0, 1, 0]).unwrap(),
            Some((Item::SubAck, 5))
        );
        assert!(parse(Proto::Mqtt, &[0x90, 3, 0, 1, 0x80]).is_err());
    }
}
