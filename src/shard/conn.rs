//! The connection driver: one task per TCP connection. Reads into the connection's buffer, feeds
//! the BEEP session, lets the profiles act on its events, and writes what the session polls,
//! coalesced into one write per round. It never parses payloads itself.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use apex_proto::beep::mgmt::{code, ErrorElement};
use apex_proto::beep::profile::Dispatcher;
use apex_proto::{Event, Role, Session};
use bytes::BytesMut;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::{debug, info};

use crate::apex_profile::ApexProfile;
use crate::shard::ShardContext;
use crate::sys;

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Released by agreement (RFC 3080 §2.4) or refused at greeting.
    Released,
    /// The peer closed or reset the transport.
    PeerClosed,
    /// Terminated for a protocol violation: aborted with a reset (RFC 3081 §2).
    Aborted,
    /// Shutdown grace expired before the peer agreed to close.
    GraceExpired,
}

enum Wake {
    Read(std::io::Result<usize>),
    Stop,
}

/// Drives one accepted connection until it ends.
pub async fn drive(mut stream: TcpStream, ctx: Rc<ShardContext>) -> Ending {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let mut session = if ctx.connections.get() > ctx.config.runtime.max_connections {
        Session::new_refusing(
            ctx.session_config.clone(),
            ErrorElement::new(code::SERVICE_NOT_AVAILABLE, "too many connections"),
        )
    } else {
        Session::new(Role::Listener, ctx.session_config.clone())
    };
    let ending = run(&mut stream, &mut session, &ctx).await;
    match ending {
        Ending::Aborted => {
            let _ = sys::reset_on_close(stream.as_raw_fd());
        }
        _ => {
            let _ = stream.shutdown(std::net::Shutdown::Both).await;
        }
    }
    debug!(?peer, ?ending, shard = ctx.id, "connection ended");
    ending
}

async fn run(stream: &mut TcpStream, session: &mut Session, ctx: &ShardContext) -> Ending {
    let read_chunk = ctx.config.runtime.read_chunk;
    let mut read_buf = BytesMut::with_capacity(read_chunk);
    let mut write_buf = BytesMut::with_capacity(read_chunk);
    let mut apex = ApexProfile::default();
    let stop = ctx.shutdown.acquire(1);
    futures_lite::pin!(stop);
    let mut closing_since: Option<Instant> = None;
    let grace = Duration::from_millis(ctx.config.shutdown_grace_ms);

    loop {
        while session.poll_transmit(&mut write_buf) > 0 {}
        if !write_buf.is_empty() {
            if stream.write_all(&write_buf).await.is_err() {
                return Ending::PeerClosed;
            }
            write_buf.clear();
        }
        if session.is_finished() {
            return Ending::Released;
        }

        let len = read_buf.len();
        read_buf.resize(len + read_chunk, 0);
        let wake = match closing_since {
            None => {
                future::or(
                    async { Wake::Read(stream.read(&mut read_buf[len..]).await) },
                    async {
                        let _ = (&mut stop).await;
                        Wake::Stop
                    },
                )
                .await
            }
            Some(since) => {
                let left = grace.saturating_sub(since.elapsed());
                future::or(
                    async { Wake::Read(stream.read(&mut read_buf[len..]).await) },
                    async {
                        glommio::timer::sleep(left).await;
                        Wake::Stop
                    },
                )
                .await
            }
        };
        let n = match wake {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                read_buf.truncate(len);
                return Ending::PeerClosed;
            }
            Wake::Read(Ok(n)) => n,
            Wake::Stop => {
                read_buf.truncate(len);
                if closing_since.is_some() {
                    return Ending::GraceExpired;
                }
                // Shutdown: ask the peer to release the session (RFC 3080 §2.4).
                closing_since = Some(Instant::now());
                let _ = session.close_session(code::SERVICE_NOT_AVAILABLE);
                continue;
            }
        };
        read_buf.truncate(len + n);
        if let Err(error) = session.handle_input(&mut read_buf, Instant::now()) {
            info!(shard = ctx.id, %error, "terminating session");
            return Ending::Aborted;
        }
        Dispatcher::new(vec![&mut apex]).dispatch(session, |_, event| {
            if let Event::CloseRefused { channel: 0, .. } = event {
                debug!("peer declined session release");
            }
        });
    }
}
