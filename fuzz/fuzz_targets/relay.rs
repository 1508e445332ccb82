//! Fuzzes the APEX relay the way the runtime drives it: through `testing::RelayNet`, whose
//! shards are the `ShardCore`s of production (sessions, relay, cross-shard envelopes, backlogs
//! and backpressure, timers). The `session` target covers one BEEP session with a test profile;
//! this one covers what the relay does with what arrives on many connections at once, which is
//! where a peer can reach relay state (the directory, transactions, reports, held data).
//!
//! Input layout: one configuration byte, then a program of actions.
//!
//! ```text
//!   config bit 0   two shards instead of one (fred and barney then live on different shards)
//!   config bit 1   grant `*@example.com` core:data (without it most data is refused: ACC)
//!   config bit 2   trust rubble.com as an intermediary relay
//!   config bit 3   tight budgets: small backlog, short stall, no slack (backpressure paths)
//!   config bit 4   tight relay sessions: few outstanding MSGs per session (backlogs form)
//!   config bit 5   raw connections start with a valid greeting already sent
//! ```
//!
//! The fixed cast, set up before the program runs (a failure there is a harness bug, so it
//! panics): fred@example.com and barney@example.com attached on edge connections, a mesh peer
//! bound as rubble.com, and raw edge and mesh connections whose octets the fuzzer writes.
//!
//! Each action is an opcode byte; the ones carrying data take a length byte and that many
//! octets (fewer at the end of the input):
//!
//! ```text
//!   0  inject raw octets on a raw connection
//!   1  send a MSG with those octets as its payload on an attached channel
//!   2  send a MSG: APEX headers + those octets (an APEX document of the fuzzer's making)
//!   3  send a `data` built from a table of originators, recipients and options, with those
//!      octets as content: reaches routing, access and options without guessing XML
//!   4  start a channel with those octets as piggybacked content
//!   5  close a channel          6  disconnect a connection      7  advance the clock
//!   8  pause / resume reading on a client (a recipient that stops reading)
//!   9  toggle a client's automatic replies    10  hold / release the shard queues
//!   11 drive
//! ```
//!
//! The opcode is taken modulo 12; the byte 0xff also opens one more raw edge connection (up
//! to eight raw ones), so that a disconnect does not end raw input for the rest of a program.
//!
//! At the end every client reads again, the shard queues flow and the clock passes the stall
//! budget and the data timers, so what was held is released, refused or reported. Checked:
//!
//! * nothing panics (the harness panics on a livelock of `drive`);
//! * the relay writes only whole, well-formed frames on every connection;
//! * every MSG a client sent is answered (BEEP: every MSG gets a reply; APEX: accepted data is
//!   never dropped silently), unless its connection or channel ended or the program switched
//!   some client's automatic replies off (the relay may then wait on that client for ever).
#![no_main]
#![allow(missing_docs)]

use std::time::Duration;

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::relay::ConnKind;
use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::shard::Budgets;
use apex_proto::testing::{split_frames, ClientId, RelayNet, APEX_PROFILE};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

/// Identities a built `data` names: attached, unattached, subaddressed, remote, the relay's
/// own report address, and malformed ones.
const IDENTITIES: [&str; 8] = [
    "fred@example.com",
    "barney@example.com",
    "wilma@example.com",
    "fred/appl=wb@example.com",
    "barney@rubble.com",
    "apex=report@example.com",
    "@example.com",
    "fred@",
];

/// Options a built `data` carries (RFC 3340 §6, RFC 3342), known and unknown.
const OPTIONS: [&str; 8] = [
    "",
    "<option internal='statusRequest' transID='86' />",
    "<option internal='statusRequest' transID='86' targetHop='final' />",
    "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='501'><dataTiming noLaterThan='5000' reportAfter='1000' returnTrip='10000' reportErrors='true' /></option>",
    "<option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='90'><dataHopping noMoreThan='2' reportErrors='true' /></option>",
    "<option internal='hold4Endpoint' transID='7' />",
    "<option internal='noSuchOption' mustUnderstand='true' transID='9' />",
    "<option internal='statusRequest' transID='86' /><option internal='hold4Endpoint' transID='8' />",
];

/// Reads the program: a cursor over the input that yields zero once it is used up, so every
/// input is a valid program.
struct Program<'a> {
    data: &'a [u8],
}

impl<'a> Program<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn pick(&mut self, n: usize) -> usize {
        usize::from(self.byte().unwrap_or(0)) % n
    }

    /// A length byte, then up to that many octets.
    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte().unwrap_or(0)).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}

/// A client with a session the fuzzer sends through, and its APEX channel.
struct Attached {
    id: ClientId,
    channel: u32,
}

fn access(grant: bool) -> AccessTable {
    let mut access = AccessTable::new();
    if grant {
        // Fixed, valid arguments: a failure is a bug in the access table's API, not input.
        access
            .grant_domain(
                "example.com",
                ActorPattern::parse("*@example.com").expect("valid pattern"),
                vec![Access::CORE_DATA],
            )
            .expect("valid grant");
    }
    access
}

fn tight_budgets() -> Budgets {
    Budgets {
        max_backlog_octets: 4096,
        max_assembly_octets: 8192,
        stall: Duration::from_millis(50),
        backlog_slack: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut program = Program { data };
    let Some(config) = program.byte() else {
        return;
    };
    let shards = if config & 0x01 != 0 { 2 } else { 1 };
    let trusted = if config & 0x04 != 0 {
        vec!["rubble.com".to_owned()]
    } else {
        Vec::new()
    };
    let budgets = if config & 0x08 != 0 {
        tight_budgets()
    } else {
        Budgets::default()
    };
    let mut net = RelayNet::with_budgets(
        "example.com",
        shards,
        access(config & 0x02 != 0),
        trusted,
        budgets,
    );
    if config & 0x10 != 0 {
        net.listener_config.limits.max_outstanding_msgs = 2;
        net.listener_config.limits.max_queued_octets = 2048;
    }
    let last = shards - 1;

    // The cast. `attach` and `bind` panic only if the relay refuses the channel itself, which
    // it must not do for a well-formed start: that would be a relay bug.
    let fred = net.connect(0, ConnKind::Edge);
    let (fred_ch, _) = net.attach(fred, "fred@example.com");
    let barney = net.connect(last, ConnKind::Edge);
    let (barney_ch, _) = net.attach(barney, "barney@example.com");
    let peer = net.connect(last, ConnKind::Mesh);
    let (peer_ch, _) = net.bind(peer, "rubble.com");
    let mut attached = vec![
        Attached {
            id: fred,
            channel: fred_ch,
        },
        Attached {
            id: barney,
            channel: barney_ch,
        },
        Attached {
            id: peer,
            channel: peer_ch,
        },
    ];
    let mut raw = vec![
        net.connect_raw(0, ConnKind::Edge),
        net.connect_raw(last, ConnKind::Edge),
        net.connect_raw(0, ConnKind::Mesh),
    ];
    if config & 0x20 != 0 {
        for &id in &raw {
            net.inject(id, GREETING);
        }
    }

    let mut sent = Vec::new();
    let mut closing = Vec::new();
    let mut silent = false;
    while let Some(op) = program.byte() {
        match op % 12 {
            0 => {
                let id = raw[program.pick(raw.len())];
                let octets = program.chunk();
                if net.clients[id].connected {
                    net.inject(id, octets);
                }
            }
            1..=3 => {
                let target = program.pick(attached.len());
                let payload = match op % 12 {
                    1 => Bytes::copy_from_slice(program.chunk()),
                    2 => {
                        let mut p = HEADERS.as_bytes().to_vec();
                        p.extend_from_slice(program.chunk());
                        Bytes::from(p)
                    }
                    _ => built_data(&mut program),
                };
                let Attached { id, channel } = attached[target];
                // A refused send (channel closed, session ended) is an answer, not a fault:
                // the harness's `send_nowait` would panic on it.
                if let Ok(msgno) = net.session(id).send_msg(channel, payload) {
                    sent.push((id, channel, msgno));
                }
            }
            4 => {
                let who = program.pick(attached.len());
                let content = Bytes::copy_from_slice(program.chunk());
                let offer = ProfileOffer {
                    uri: APEX_PROFILE.to_owned(),
                    content: Some(content),
                };
                let id = attached[who].id;
                if let Ok(channel) = net.session(id).start_channel(vec![offer], None) {
                    net.drive();
                    // Later sends may use the new channel, if the relay created it.
                    if net.clients[id].started.iter().any(|(c, _)| *c == channel) {
                        attached.push(Attached { id, channel });
                    }
                }
            }
            5 => {
                let Attached { id, channel } = attached[program.pick(attached.len())];
                closing.push((id, channel));
                let _ = net.session(id).close_channel(channel, 200);
            }
            6 => {
                let all = net.clients.len();
                net.disconnect(program.pick(all));
            }
            7 => {
                let ms = u64::from(program.byte().unwrap_or(0)) * 20;
                net.advance(ms);
            }
            8 => {
                let all = net.clients.len();
                let client = &mut net.clients[program.pick(all)];
                client.paused = !client.paused;
            }
            9 => {
                let all = net.clients.len();
                let client = &mut net.clients[program.pick(all)];
                client.auto_reply = !client.auto_reply;
                silent = true;
            }
            10 => net.pause_mesh = !net.pause_mesh,
            _ => {
                net.drive();
            }
        }
        // A new raw connection now and then, so a disconnect does not end the fuzzing of raw
        // input for the rest of the program (and connections opened mid-run are covered).
        if op == 0xff && raw.len() < 8 {
            let shard = raw.len() % shards;
            raw.push(net.connect_raw(shard, ConnKind::Edge));
        }
    }

    // Let everything flow: readers read, the shard queues move, and the clock passes the
    // stall budget and the data timers so that held and backlogged data is settled.
    for client in &mut net.clients {
        client.paused = false;
    }
    net.pause_mesh = false;
    net.drive();
    for _ in 0..3 {
        net.advance(10_000);
    }

    for (id, client) in net.clients.iter().enumerate() {
        let whole: usize = split_frames(&client.from_relay)
            .iter()
            .map(Bytes::len)
            .sum();
        assert_eq!(
            whole,
            client.from_relay.len(),
            "client {id}: the relay wrote a partial or malformed frame"
        );
    }
    if !silent {
        for &(id, channel, msgno) in &sent {
            let client = &net.clients[id];
            if client.connected
                && client.error.is_none()
                && !closing.contains(&(id, channel))
                && !client.closed.contains(&channel)
            {
                assert!(
                    client.reply_to(channel, msgno).is_some(),
                    "client {id}: MSG {channel} {msgno} was never answered"
                );
            }
        }
    }
});

/// A `data` document from the tables, with fuzz octets as its inline content.
fn built_data(program: &mut Program<'_>) -> Bytes {
    let originator = IDENTITIES[program.pick(IDENTITIES.len())];
    let recipients = 1 + program.pick(3);
    let mut doc = format!("{HEADERS}<data content='#C'><originator identity='{originator}' />");
    for _ in 0..recipients {
        let recipient = IDENTITIES[program.pick(IDENTITIES.len())];
        doc.push_str(&format!("<recipient identity='{recipient}' />"));
    }
    doc.push_str(OPTIONS[program.pick(OPTIONS.len())]);
    doc.push_str("<data-content Name='C'>");
    let mut payload = doc.into_bytes();
    payload.extend_from_slice(program.chunk());
    payload.extend_from_slice(b"</data-content></data>");
    Bytes::from(payload)
}
