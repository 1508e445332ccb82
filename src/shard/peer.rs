//! Outbound relay-to-relay links (RFC 3340 §3.1, §4.4.4.1 step 5.2): one link per
//! remote domain, owned by the shard `domain_shard(domain)`. A link resolves the domain's relay
//! (static route from configuration), connects to its apex-mesh port as BEEP initiator, starts
//! the APEX profile with a piggybacked `bind` for our domain, then sends the data queued for
//! that domain, pipelined. The next relay's `ok` is success; an `error`, a lost connection or no
//! route is a failure, reported to the originator when it asked (statusRequest). Reconnects
//! with a doubling backoff.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use apex_proto::apex::msg::{self, Operation};
use apex_proto::beep::mgmt::{code, ProfileOffer};
use apex_proto::beep::output::Vectored;
use apex_proto::{Event, ReplyKind, Role, Session, SessionConfig};
use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncReadExt};
use glommio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::apex_profile::APEX_PROFILE;
use crate::shard::conn::{write_out, SHARED_PAYLOAD_MIN, WRITE_ROOM};
use crate::shard::notify::Notify;
use crate::shard::ShardContext;

/// Data waiting for one remote domain.
#[derive(Debug)]
pub struct Link {
    domain: String,
    queue: RefCell<VecDeque<Bytes>>,
    wake: Notify,
}

/// Queues `payload` for `domain` on this shard's link, creating (and starting) the link when
/// needed. A full queue fails the data at once.
pub fn enqueue(ctx: &Rc<ShardContext>, domain: String, payload: Bytes) {
    let existing = ctx.links.borrow().get(&domain).cloned();
    let link = match existing {
        Some(link) => link,
        None => {
            let link = Rc::new(Link {
                domain: domain.clone(),
                queue: RefCell::new(VecDeque::new()),
                wake: Notify::default(),
            });
            ctx.links.borrow_mut().insert(domain, link.clone());
            glommio::spawn_local(run_link(ctx.clone(), link.clone())).detach();
            link
        }
    };
    if link.queue.borrow().len() >= ctx.config.mesh.link_queue {
        // The caller (the shard's dispatch) carries out the report.
        ctx.forward_failed(&payload, "relay link queue is full");
        return;
    }
    link.queue.borrow_mut().push_back(payload);
    link.wake.notify();
}

fn fail_queued(ctx: &ShardContext, link: &Link, reason: &str) {
    let failed: Vec<Bytes> = link.queue.borrow_mut().drain(..).collect();
    for payload in failed {
        ctx.forward_failed(&payload, reason);
    }
}

async fn run_link(ctx: Rc<ShardContext>, link: Rc<Link>) {
    let max_backoff = Duration::from_millis(ctx.config.mesh.max_backoff_ms);
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        if ctx.stopping() {
            fail_queued(&ctx, &link, "relay shutting down");
            ctx.dispatch();
            return;
        }
        if link.queue.borrow().is_empty() {
            future::or(link.wake.notified(), async {
                let _ = ctx.shutdown.acquire(1).await;
            })
            .await;
            continue;
        }
        let addrs = match ctx.route(&link.domain) {
            Some(addr) => vec![addr],
            None => match crate::dns::resolve_mesh(&ctx.config.mesh, &link.domain).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    warn!(shard = ctx.id, domain = %link.domain, error = %e, "no route");
                    fail_queued(&ctx, &link, "no route to the recipient's domain");
                    ctx.dispatch();
                    continue;
                }
            },
        };
        match connect(&addrs).await {
            Ok((stream, addr)) => {
                attempts = 0;
                backoff = Duration::from_millis(100);
                info!(shard = ctx.id, domain = %link.domain, %addr, "relay link connected");
                drive(stream, &ctx, &link).await;
                ctx.dispatch();
            }
            Err(e) => {
                attempts += 1;
                warn!(shard = ctx.id, domain = %link.domain, ?addrs, error = %e, attempts, "relay link failed");
                if attempts >= ctx.config.mesh.connect_attempts {
                    fail_queued(&ctx, &link, "the recipient's relay is unreachable");
                    ctx.dispatch();
                    attempts = 0;
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

enum Wake {
    Read(std::io::Result<usize>),
    Work,
    Stop,
}

/// One connection of a link, until it ends. Data sent but not answered when it ends fails.
async fn drive(mut stream: TcpStream, ctx: &Rc<ShardContext>, link: &Link) {
    let _ = stream.set_nodelay(true);
    let mut session = Session::new(
        Role::Initiator,
        SessionConfig {
            limits: ctx.session_config.limits.clone(),
            ..SessionConfig::default()
        },
    );
    let read_chunk = ctx.config.runtime.read_chunk;
    let mut read_buf = BytesMut::with_capacity(read_chunk);
    // Read into zeroed scratch and append what arrived (see the connection driver).
    let mut scratch = vec![0u8; read_chunk];
    let mut out = Vectored::new(SHARED_PAYLOAD_MIN);
    let mut parts = Vec::new();
    let mut channel: Option<u32> = None;
    let mut in_flight: VecDeque<Bytes> = VecDeque::new();
    let apex_limits: msg::ApexLimits = (&ctx.config.apex).into();
    let bind = format!(
        "<bind relay='{}' transID='1' />",
        apex_proto::xml::escape(&ctx.config.domain)
    );
    let outcome: Result<(), String> = loop {
        if let Some(channel) = channel {
            while in_flight.len() < ctx.config.mesh.link_in_flight {
                let Some(payload) = link.queue.borrow_mut().pop_front() else {
                    break;
                };
                if session.send_msg(channel, payload.clone()).is_err() {
                    link.queue.borrow_mut().push_front(payload);
                    break;
                }
                in_flight.push_back(payload);
            }
        }
        if session.has_output() {
            out.make_room(WRITE_ROOM);
        }
        while session.poll_transmit(&mut out) > 0 {}
        if !out.is_empty() && write_out(&mut stream, &mut out, &mut parts).await.is_err() {
            break Err("connection to the next relay lost".into());
        }
        if session.is_finished() {
            break Ok(());
        }
        let wake = future::or(
            future::or(
                async { Wake::Read(stream.read(&mut scratch).await) },
                async {
                    link.wake.notified().await;
                    Wake::Work
                },
            ),
            async {
                let _ = ctx.shutdown.acquire(1).await;
                Wake::Stop
            },
        )
        .await;
        let n = match wake {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                break Err("connection to the next relay lost".into());
            }
            Wake::Read(Ok(n)) => n,
            Wake::Work => continue,
            Wake::Stop => {
                let _ = session.close_session(code::SERVICE_NOT_AVAILABLE);
                while session.poll_transmit(&mut out) > 0 {}
                let _ = write_out(&mut stream, &mut out, &mut parts).await;
                break Err("relay shutting down".into());
            }
        };
        read_buf.extend_from_slice(&scratch[..n]);
        if let Err(e) = session.handle_input(&mut read_buf, Instant::now()) {
            break Err(format!("next relay broke the protocol: {e}"));
        }
        let mut failure = None;
        while let Some(event) = session.poll_event() {
            match event {
                Event::Greeting(greeting) => {
                    if !greeting.profiles.iter().any(|p| p == APEX_PROFILE) {
                        failure = Some("the next relay does not offer APEX".to_owned());
                        break;
                    }
                    let offer = ProfileOffer {
                        uri: APEX_PROFILE.to_owned(),
                        content: Some(Bytes::from(bind.clone())),
                    };
                    if session.start_channel(vec![offer], None).is_err() {
                        failure = Some("cannot start an APEX channel".to_owned());
                    }
                }
                Event::ChannelStarted {
                    channel: ch,
                    content,
                    ..
                } => {
                    let accepted = content
                        .as_ref()
                        .and_then(|c| msg::parse_document(c, &apex_limits).ok());
                    match accepted {
                        Some(Operation::Ok) => {
                            debug!(domain = %link.domain, "bound at the next relay");
                            channel = Some(ch);
                        }
                        Some(Operation::Error { code, text }) => {
                            failure =
                                Some(format!("the next relay refused our bind: {code} {text}"));
                        }
                        _ => failure = Some("the next relay answered the bind oddly".to_owned()),
                    }
                }
                Event::StartRefused { error, .. } => {
                    failure = Some(format!(
                        "the next relay refused the APEX channel: {}",
                        error.code
                    ));
                }
                Event::Reply { kind, payload, .. } => {
                    if let Some(sent) = in_flight.pop_front() {
                        if kind != ReplyKind::Rpy {
                            let reason = match msg::parse_message(&payload, &apex_limits) {
                                Ok(Operation::Error { code, text }) => {
                                    format!("next relay: {code} {text}")
                                }
                                _ => "refused by the next relay".to_owned(),
                            };
                            ctx.forward_failed(&sent, &reason);
                        }
                    }
                }
                Event::Message { channel, msgno, .. } => {
                    let refusal =
                        msg::error_payload(code::NOT_IMPLEMENTED, "send over your own relay link");
                    let _ = session.send_err(channel, msgno, refusal);
                }
                _ => {}
            }
        }
        if let Some(reason) = failure {
            break Err(reason);
        }
        ctx.dispatch();
    };
    if let Err(reason) = outcome {
        warn!(shard = ctx.id, domain = %link.domain, %reason, "relay link ended");
        for payload in in_flight.drain(..) {
            ctx.forward_failed(&payload, &reason);
        }
        if channel.is_none() {
            // Never bound: the queued data cannot go this way either.
            fail_queued(ctx, link, &reason);
        }
    }
}

/// Connects to the first of `addrs` that accepts, trying them in order (RFC 2782: every address
/// of every target); when none does, the last error.
async fn connect(addrs: &[SocketAddr]) -> std::io::Result<(TcpStream, SocketAddr)> {
    let mut last = std::io::Error::other("no address to connect to");
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => {
                debug!(%addr, error = %e, "relay address refused");
                last = e.into();
            }
        }
    }
    Err(last)
}

impl ShardContext {
    /// The address of `domain`'s relay: a static route.
    pub fn route(&self, domain: &str) -> Option<SocketAddr> {
        self.routes
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map(|(_, a)| *a)
    }
}
