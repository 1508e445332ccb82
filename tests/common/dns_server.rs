//! A tiny authoritative DNS server on loopback for tests (RFC 1035 wire format, encoded by hand):
//! answers SRV, A and AAAA queries for a fixed zone over UDP and TCP on one 127.0.0.1 port, so
//! that no test needs the machine's resolver. Used by the integration tests (`common`) and by
//! `src/dns.rs`'s unit tests, which include this file.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const NXDOMAIN: u8 = 3;

/// One record's data.
#[derive(Debug, Clone)]
pub enum Data {
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
}

impl Data {
    fn record_type(&self) -> u16 {
        match self {
            Data::Srv { .. } => TYPE_SRV,
            Data::A(_) => TYPE_A,
            Data::Aaaa(_) => TYPE_AAAA,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Data::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                out.extend_from_slice(&priority.to_be_bytes());
                out.extend_from_slice(&weight.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
                encode_name(target, out);
            }
            Data::A(ip) => out.extend_from_slice(&ip.octets()),
            Data::Aaaa(ip) => out.extend_from_slice(&ip.octets()),
        }
    }
}

/// The names and records served; names are compared without case and final dot.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: Vec<(String, Data)>,
    /// Answer nothing at all (a server that is down or a path that drops packets).
    silent: bool,
    /// Answer every UDP query with an empty truncated (TC) response, so that the resolver has to
    /// ask again over TCP.
    truncate_udp: bool,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    pub fn srv(mut self, name: &str, priority: u16, weight: u16, port: u16, target: &str) -> Zone {
        self.records.push((
            key(name),
            Data::Srv {
                priority,
                weight,
                port,
                target: target.to_owned(),
            },
        ));
        self
    }

    pub fn a(mut self, name: &str, ip: [u8; 4]) -> Zone {
        self.records.push((key(name), Data::A(ip.into())));
        self
    }

    pub fn aaaa(mut self, name: &str, ip: Ipv6Addr) -> Zone {
        self.records.push((key(name), Data::Aaaa(ip)));
        self
    }

    pub fn silent(mut self) -> Zone {
        self.silent = true;
        self
    }

    pub fn truncate_udp(mut self) -> Zone {
        self.truncate_udp = true;
        self
    }
}

/// One query received: (name without final dot, lower case; type; over TCP).
pub type Query = (String, u16, bool);

/// A running server; stops when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    queries: Arc<Mutex<Vec<Query>>>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(zone: Zone) -> DnsServer {
        // UDP and TCP on the same port number: take a free UDP port, then its TCP twin.
        let (udp, tcp) = (0..100)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("a free loopback port for UDP and TCP");
        let addr = udp.local_addr().unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let zone = Arc::new(zone);
        let udp_thread = {
            let (stop, queries, zone) = (stop.clone(), queries.clone(), zone.clone());
            std::thread::spawn(move || serve_udp(&udp, &zone, &queries, &stop))
        };
        let tcp_thread = {
            let (stop, queries, zone) = (stop.clone(), queries.clone(), zone.clone());
            std::thread::spawn(move || serve_tcp(&tcp, &zone, &queries, &stop))
        };
        DnsServer {
            addr,
            stop,
            queries,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// The queries received so far, in order.
    pub fn queries(&self) -> Vec<Query> {
        self.queries.lock().unwrap().clone()
    }

    /// Whether a query for `name` of type A or AAAA was received.
    pub fn asked_addresses_of(&self, name: &str) -> bool {
        let name = key(name);
        self.queries()
            .iter()
            .any(|(n, t, _)| *n == name && (*t == TYPE_A || *t == TYPE_AAAA))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_udp(socket: &UdpSocket, zone: &Zone, queries: &Mutex<Vec<Query>>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        if let Some(response) = respond(&buf[..n], zone, queries, false) {
            let _ = socket.send_to(&response, from);
        }
    }
}

fn serve_tcp(listener: &TcpListener, zone: &Zone, queries: &Mutex<Vec<Query>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => serve_tcp_connection(stream, zone, queries, stop),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

/// Length-prefixed messages (RFC 1035 §4.2.2), one connection at a time.
fn serve_tcp_connection(
    mut stream: TcpStream,
    zone: &Zone,
    queries: &Mutex<Vec<Query>>,
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(response) = respond(&message, zone, queries, true) {
                let mut framed = (response.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&response);
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        }
    }
}

/// The response to one query message, or `None` to stay silent.
fn respond(query: &[u8], zone: &Zone, queries: &Mutex<Vec<Query>>, tcp: bool) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let (name, end) = decode_name(query, 12)?;
    let qtype = u16::from_be_bytes([*query.get(end)?, *query.get(end + 1)?]);
    let question_end = end + 4;
    query.get(..question_end)?;
    queries.lock().unwrap().push((name.clone(), qtype, tcp));
    if zone.silent {
        return None;
    }
    let known = zone.records.iter().any(|(n, _)| *n == name);
    let answers: Vec<&Data> = zone
        .records
        .iter()
        .filter(|(n, d)| *n == name && d.record_type() == qtype)
        .map(|(_, d)| d)
        .collect();
    let truncated = zone.truncate_udp && !tcp;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]); // id
    let recursion_desired = query[2] & 0x01;
    // QR, opcode QUERY, AA, TC when truncated, RD as asked; RA; RCODE.
    out.push(0x80 | 0x04 | if truncated { 0x02 } else { 0 } | recursion_desired);
    let rcode = if known { 0 } else { NXDOMAIN };
    out.push(0x80 | rcode);
    let count = if truncated { 0 } else { answers.len() as u16 };
    for field in [1u16, count, 0, 0] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out.extend_from_slice(&query[12..question_end]);
    if !truncated {
        for data in answers {
            out.extend_from_slice(&[0xC0, 12]); // the question's name
            out.extend_from_slice(&data.record_type().to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes()); // IN
            out.extend_from_slice(&60u32.to_be_bytes()); // TTL
            let mut rdata = Vec::new();
            data.encode(&mut rdata);
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(&rdata);
        }
    }
    Some(out)
}

/// A query's name at `at` (no compression in questions): (lower case, no final dot; the offset
/// after it).
fn decode_name(message: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(message.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    Some((labels.join("."), at))
}

fn encode_name(name: &str, out: &mut Vec<u8>) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}
