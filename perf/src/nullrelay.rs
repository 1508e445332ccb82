//! The null relay: the ceiling baseline. It parses nothing past a 16-octet hello and copies the
//! bytes of sender `i` to receiver `i` verbatim.
//!
//! ```text
//!   hello (16 octets): ROLE ('S' sender, 'R' receiver) | pair id (u32 BE) | 11 octets padding
//!   then, sender only: whatever it sends (apex-load sends u32 BE length + payload frames)
//! ```
//!
//! One thread per pair copies through a 256 KiB buffer once both ends are there. Fan patterns
//! (two senders or two receivers on one pair id) are refused: the second connection is closed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Octets of the hello every connection starts with.
pub(crate) const HELLO_LEN: usize = 16;

/// Bytes moved per read/write.
const COPY_CHUNK: usize = 256 * 1024;

/// How long a new connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The hello for `role` (`b'S'` or `b'R'`) on pair `pair`.
pub(crate) fn hello(role: u8, pair: u32) -> [u8; HELLO_LEN] {
    let mut h = [b' '; HELLO_LEN];
    h[0] = role;
    h[1..5].copy_from_slice(&pair.to_be_bytes());
    h
}

/// Reads a hello: (role, pair).
pub(crate) fn parse_hello(h: &[u8; HELLO_LEN]) -> Option<(u8, u32)> {
    let role = h[0];
    if role != b'S' && role != b'R' {
        return None;
    }
    Some((role, u32::from_be_bytes([h[1], h[2], h[3], h[4]])))
}

/// Ends of a pair not yet matched.
#[derive(Debug, Default)]
struct Waiting {
    sender: Option<TcpStream>,
    receiver: Option<TcpStream>,
}

/// Listens on `listen` (loopback, checked by the caller) and forwards forever.
pub(crate) fn run(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    println!("null-relay ready listen={local}");
    let waiting: Arc<Mutex<HashMap<u32, Waiting>>> = Arc::default();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("null-relay: accept: {e}");
                continue;
            }
        };
        let waiting = Arc::clone(&waiting);
        // The hello is read off the accept thread so a silent client cannot stall others.
        let spawned = std::thread::Builder::new()
            .name("null-hello".into())
            .spawn(move || {
                if let Err(e) = admit(stream, &waiting) {
                    eprintln!("null-relay: {e:#}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("null-relay: spawning a thread: {e}");
        }
    }
    Ok(())
}

/// Reads the hello and pairs the connection up; starts the copy once both ends are there.
fn admit(mut stream: TcpStream, waiting: &Mutex<HashMap<u32, Waiting>>) -> Result<()> {
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .context("setting the read timeout")?;
    let mut h = [0u8; HELLO_LEN];
    stream.read_exact(&mut h).context("reading the hello")?;
    stream
        .set_read_timeout(None)
        .context("clearing the read timeout")?;
    let Some((role, pair)) = parse_hello(&h) else {
        bail!("bad hello {h:?}: closing");
    };
    let ready = {
        let mut map = waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let w = map.entry(pair).or_default();
        let slot = if role == b'S' {
            &mut w.sender
        } else {
            &mut w.receiver
        };
        if slot.is_some() {
            bail!(
                "pair {pair} already has a {}: fan patterns are not supported by the null relay",
                if role == b'S' { "sender" } else { "receiver" }
            );
        }
        *slot = Some(stream);
        if w.sender.is_some() && w.receiver.is_some() {
            map.remove(&pair)
        } else {
            None
        }
    };
    if let Some(Waiting {
        sender: Some(from),
        receiver: Some(to),
    }) = ready
    {
        copy(from, to, pair);
    }
    Ok(())
}

/// Copies `from` to `to` until `from` ends or `to` fails.
fn copy(mut from: TcpStream, mut to: TcpStream, pair: u32) {
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("null-relay: pair {pair}: reading the sender: {e}");
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            eprintln!("null-relay: pair {pair}: writing to the receiver: {e}");
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip() {
        let h = hello(b'S', 7);
        assert_eq!(parse_hello(&h), Some((b'S', 7)));
        assert_eq!(parse_hello(&hello(b'R', u32::MAX)), Some((b'R', u32::MAX)));
        assert_eq!(parse_hello(&hello(b'X', 1)), None);
    }

    #[test]
    fn forwards_sender_bytes_to_its_receiver() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        std::thread::spawn(move || run(addr));
        let connect = || {
            for _ in 0..200 {
                if let Ok(s) = TcpStream::connect(addr) {
                    return s;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("null relay never listened");
        };
        let mut r = connect();
        r.write_all(&hello(b'R', 3)).unwrap();
        let mut s = connect();
        s.write_all(&hello(b'S', 3)).unwrap();
        s.write_all(b"hello, world").unwrap();
        drop(s);
        let mut got = Vec::new();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello, world");
    }
}
