//! Fuzzes tuning (RFC 3080 §3, §4) as the shard core runs it: TLS `ready`/`proceed` and the
//! switch to TLS mid-buffer, the handshake, the session that starts over under TLS, and the
//! SASL exchanges (SCRAM-SHA-256, PLAIN, EXTERNAL) with the attach that depends on them.
//!
//! Input layout: one configuration byte, then a program of actions on one edge connection.
//!
//! ```text
//!   config bit 0   offer TLS        config bit 1   two shards
//! ```
//!
//! Each action is an opcode byte; those carrying data take a length byte and that many octets:
//!
//! ```text
//!   0  raw octets onto the connection (before TLS: frames; after: TLS records)
//!   1  start the TLS channel: `ready` piggybacked, or not (then the next op 3 sends it)
//!   2  run the TLS handshake with an in-memory rustls client, when TLS began
//!   3  a MSG on the last started channel: `ready`, or a `blob` of the octets
//!   4  start a SASL channel (SCRAM, PLAIN, EXTERNAL, unknown) with a blob of the octets
//!   5  start an APEX channel with an attach of fred or barney
//!   6  the octets as a whole frame on channel 0
//! ```
//!
//! Before TLS the fuzzer writes frames itself (sequence numbers tracked per channel); after the
//! handshake it writes them through its TLS client. Checked: nothing panics, and a connection
//! the core did not end keeps its output bounded.
#![no_main]
#![allow(missing_docs)]

use std::sync::{Arc, OnceLock};

use apex_proto::apex::relay::ConnKind;
use apex_proto::auth::scram::ScramVerifier;
use apex_proto::auth::users::Users;
use apex_proto::shard::Security;
use apex_proto::testing::{ClientId, RelayNet};
use apex_proto::tls::{crypto_provider, TlsLayer};
use base64::Engine as _;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

const MECHANISMS: [&str; 4] = ["SCRAM-SHA-256", "PLAIN", "EXTERNAL", "DIGEST-MD5"];

struct Configs {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    users: Arc<Users>,
}

/// A certificate for example.com and the users, made once per process.
fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["example.com".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let server = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Few iterations: the fuzzer should spend its time on the exchange, not on PBKDF2.
        let verifier = ScramVerifier::from_password("secret", b"fuzz salt", 16);
        let users = Users::parse(&format!("fred@example.com {verifier}\n"), "fuzz")
            .expect("users");
        Configs {
            server: Arc::new(server),
            client: Arc::new(client),
            users: Arc::new(users),
        }
    })
}

struct Program<'a> {
    data: &'a [u8],
}

impl<'a> Program<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte().unwrap_or(0)).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}

/// The fuzzer's side of the connection: frame numbering, and its TLS client once TLS began.
struct Peer {
    id: ClientId,
    seqno: std::collections::HashMap<u32, u32>,
    msgno: std::collections::HashMap<u32, u32>,
    next_channel: u32,
    last_channel: u32,
    tls_began: bool,
    tls: Option<TlsLayer>,
    /// Relay output already handed to the TLS client.
    taken: usize,
}

impl Peer {
    fn frame(&mut self, channel: u32, keyword: &str, msgno: u32, payload: &[u8]) -> Vec<u8> {
        let seqno = self.seqno.entry(channel).or_insert(0);
        let mut frame = format!("{keyword} {channel} {msgno} . {seqno} {}\r\n", payload.len())
            .into_bytes();
        *seqno = seqno.wrapping_add(payload.len() as u32);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"END\r\n");
        frame
    }

    fn msg(&mut self, net: &mut RelayNet, channel: u32, payload: &[u8]) {
        let first = u32::from(channel == 0);
        let msgno = *self.msgno.entry(channel).or_insert(first);
        self.msgno.insert(channel, msgno.wrapping_add(1));
        let frame = self.frame(channel, "MSG", msgno, payload);
        self.write(net, &frame);
    }

    fn write(&mut self, net: &mut RelayNet, octets: &[u8]) {
        match &mut self.tls {
            Some(tls) if !tls.is_handshaking() => {
                let _ = tls.send(octets);
                self.flush_tls(net);
            }
            _ => net.inject(self.id, octets),
        }
    }

    fn flush_tls(&mut self, net: &mut RelayNet) {
        if let Some(tls) = &mut self.tls {
            let mut wire = BytesMut::new();
            tls.transmit(&mut wire);
            if !wire.is_empty() {
                net.inject(self.id, &wire);
            }
        }
    }

    /// Hands the relay's new output to the TLS client (after the `proceed`).
    fn read_tls(&mut self, net: &mut RelayNet) -> bool {
        let Some(tls) = &mut self.tls else {
            return true;
        };
        let out = &net.clients[self.id].from_relay;
        let mut wire = BytesMut::from(&out[self.taken.min(out.len())..]);
        self.taken = out.len();
        let mut plain = BytesMut::new();
        tls.receive(&mut wire, &mut plain).is_ok()
    }

    fn start(&mut self, net: &mut RelayNet, uri: &str, piggyback: Option<&str>) {
        let channel = self.next_channel;
        self.next_channel += 2;
        self.last_channel = channel;
        let content = piggyback.map_or(String::new(), |p| format!("<![CDATA[{p}]]>"));
        let start = format!(
            "Content-Type: application/beep+xml\r\n\r\n<start number='{channel}'><profile uri='{uri}'>{content}</profile></start>"
        );
        self.msg(net, 0, start.as_bytes());
    }
}

fn blob(data: &[u8]) -> String {
    format!("<blob>{}</blob>", base64::engine::general_purpose::STANDARD.encode(data))
}

fuzz_target!(|data: &[u8]| {
    let mut program = Program { data };
    let config = program.byte().unwrap_or(0);
    let configs = configs();
    let shards = if config & 2 != 0 { 2 } else { 1 };
    let mut net = RelayNet::new("example.com", shards);
    let security = Security {
        tls_server: (config & 1 != 0).then(|| configs.server.clone()),
        tls_client: None,
        users: configs.users.clone(),
    };
    net.set_security(security);
    net.set_auth(apex_proto::apex::relay::AuthPolicy {
        mode: apex_proto::apex::relay::AuthMode::Required,
        ..Default::default()
    });
    let id = net.connect_raw(0, ConnKind::Edge);
    net.inject(id, GREETING);
    let mut peer = Peer {
        id,
        seqno: Default::default(),
        msgno: Default::default(),
        next_channel: 1,
        last_channel: 1,
        tls_began: false,
        tls: None,
        taken: 0,
    };
    let mut steps = 0;
    while let Some(op) = program.byte() {
        steps += 1;
        if steps > 64 {
            break;
        }
        match op % 7 {
            0 => {
                let raw = program.chunk();
                net.inject(id, raw);
            }
            1 => {
                let piggyback = program.byte().unwrap_or(0) & 1 == 0;
                peer.start(
                    &mut net,
                    "http://iana.org/beep/TLS",
                    piggyback.then_some("<ready />"),
                );
                if piggyback && !peer.tls_began {
                    peer.tls_began = true;
                    peer.taken = net.clients[id].from_relay.len();
                    if let Ok(tls) = TlsLayer::client(configs.client.clone(), "example.com") {
                        peer.tls = Some(tls);
                    }
                }
            }
            2 => {
                for _ in 0..4 {
                    peer.flush_tls(&mut net);
                    if !peer.read_tls(&mut net) {
                        break;
                    }
                }
                if peer.tls.as_ref().is_some_and(|t| !t.is_handshaking()) {
                    // The new session: the fuzzer greets again, numbering from scratch.
                    peer.seqno.clear();
                    peer.msgno.clear();
                    peer.next_channel = 1;
                    peer.write(&mut net, GREETING);
                }
            }
            3 => {
                let octets = program.chunk();
                let channel = peer.last_channel;
                let body = if octets.first() == Some(&0) {
                    "<ready />".to_owned()
                } else {
                    blob(octets)
                };
                let payload = format!("Content-Type: application/beep+xml\r\n\r\n{body}");
                peer.msg(&mut net, channel, payload.as_bytes());
            }
            4 => {
                let mechanism = MECHANISMS[usize::from(program.byte().unwrap_or(0)) % 4];
                let octets = program.chunk();
                let piggyback = blob(octets);
                let uri = format!("http://iana.org/beep/SASL/{mechanism}");
                peer.start(&mut net, &uri, Some(&piggyback));
            }
            5 => {
                let who = if program.byte().unwrap_or(0) & 1 == 0 { "fred" } else { "barney" };
                let attach = format!("<attach endpoint='{who}@example.com' transID='1' />");
                peer.start(&mut net, "http://iana.org/beep/APEX", Some(&attach));
            }
            _ => {
                let octets = program.chunk().to_vec();
                peer.msg(&mut net, 0, &octets);
            }
        }
        net.drive();
    }
    net.drive();
});
