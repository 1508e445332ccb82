//! What apexd tells the service manager that started it, in systemd's notification protocol
//! (sd_notify(3), `Type=notify` in `dist/apexd.service`): `READY=1` once every shard listens and
//! `STOPPING=1` as soon as a shutdown signal arrives, each with a `STATUS=` line that
//! `systemctl status` shows. Without `NOTIFY_SOCKET` in the environment (apexd not started by
//! systemd) nothing is sent and no thread is started.
//!
//! Owns these messages only: when the relay is ready and when it stops is decided by the
//! binary and the shards, which call in here.

use std::ffi::c_int;

use anyhow::{Context, Result};
use sd_notify::NotifyState;

use crate::shard::Bound;

/// The environment variable systemd sets for a `Type=notify` service: the datagram socket that
/// takes the notifications.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells the service manager the relay is serving: until then `systemctl start apexd` waits and
/// units ordered after apexd do not start. The status names what is served, in the same
/// `key=value` form as the ready line apexd prints.
pub fn ready(domain: &str, bound: &Bound) {
    let status = format!(
        "serving domain={domain} edge={} mesh={} shards={}",
        bound.edge, bound.mesh, bound.shards
    );
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells the service manager apexd is stopping: the sessions are being released, which may take
/// up to `shutdown_grace_ms`, and systemd should not take the silence for a hang.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: releasing sessions"),
    ]);
}

/// Sends `STOPPING=1` when the first of `signals` arrives, from a thread of its own. The shards
/// learn of the same signal through their stop flag and poll it, so the notification is not
/// held back by that poll. Does nothing when apexd was not started by a service manager.
pub fn stopping_on(signals: &[c_int]) -> Result<()> {
    if std::env::var_os(NOTIFY_SOCKET).is_none() {
        return Ok(());
    }
    let mut watched = signal_hook::iterator::Signals::new(signals)
        .context("cannot watch the shutdown signals for the service manager")?;
    std::thread::Builder::new()
        .name("apexd-notify".into())
        .spawn(move || {
            if watched.forever().next().is_some() {
                stopping();
            }
            // Dropping `watched` unregisters it; the stop flag's handlers stay.
        })
        .context("cannot start the service manager notification thread")?;
    Ok(())
}

/// A notification that cannot be sent is logged, never fatal: the relay serves either way, and
/// systemd reports a missing `READY=1` itself (start timeout).
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager through ${NOTIFY_SOCKET}: {e}");
    }
}
