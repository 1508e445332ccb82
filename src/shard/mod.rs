//! Shards: one glommio `LocalExecutor` per CPU, each owning the connections the kernel hands its
//! SO_REUSEPORT listeners on the edge (913) and mesh (912) ports, connected to the other shards
//! by the channel mesh. Nothing about a connection is shared between shards.

pub mod accept;
pub mod conn;
pub mod mesh;
pub mod notify;
pub mod outbox;
pub mod peer;
pub mod session_log;
pub mod warnings;

use std::cell::{Cell, RefCell};

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use apex_proto::apex::relay::{AuthPolicy, ConnId, ConnKind, Envelope, Relay, RelayConfig};
use apex_proto::shard::{Output, ShardCore};
use apex_proto::{Limits, SessionConfig};
use glommio::net::TcpListener;
use glommio::sync::Semaphore;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use tracing::{info, warn};

use crate::apex_profile::APEX_PROFILE;
use crate::config::Config;
use crate::monitor::{EndpointList, LinkList, Probe, ShardReport};
use crate::reload::{Settings, SharedSettings};
use crate::security::SharedSecurity;
use crate::store::{SharedAccess, Store};
use crate::sys;
use apex_proto::store::{HeldMessage, HoldId, StoreDone};
use mesh::{ShardMesh, ShardMsg};
use notify::Notify;

/// What every task of one shard shares (never crosses threads).
pub struct ShardContext {
    /// Shard index.
    pub id: usize,
    /// The validated configuration the shard started with. What a reload changes is in
    /// force in `core` and `routes` (see [`ShardContext::apply_settings`]), not here.
    pub config: Config,
    /// Closed when the shard shuts down: every waiter wakes.
    pub shutdown: Semaphore,
    /// Open connections on this shard.
    pub connections: Cell<usize>,
    /// The shard's sessions, relay and backpressure (the sans-IO shard core).
    pub core: RefCell<ShardCore>,
    /// Each connection's driver wake-up, for the core's [`Output::Wake`] (FxHash: the keys are
    /// the shard's own numbers).
    pub wakers: RefCell<FxHashMap<ConnId, Rc<Notify>>>,
    /// Wakes the timer task when the core's next timeout became earlier.
    pub timer: Notify,
    /// Queues to the other shards (none with one shard).
    pub mesh: Option<ShardMesh>,
    /// Static routes to other relays, replaced by a reload.
    pub routes: RefCell<Vec<(String, SocketAddr)>>,
    /// Set when shutdown begins (with `shutdown` closed).
    pub stopping: Cell<bool>,
    /// Envelopes waiting for each peer shard's queue, in order; one flusher task per peer
    /// sends them, so envelopes to a shard never overtake each other.
    pub outboxes: Vec<outbox::Outbox<ShardMsg>>,
    /// Outboxes over their limit (`runtime.mesh_queue` envelopes); while there are any the
    /// shard's connections pause reading.
    pub outbox_backlog: notify::Backlog,
    /// The durable store, which takes the core's [`Output::Store`] requests.
    pub store: Store,
    /// The access table the store publishes.
    pub access: Arc<SharedAccess>,
    /// The generation of that table in force on this shard.
    pub access_seen: Cell<u64>,
    /// Octets read from this shard's connections (plain counters: only this shard's thread
    /// touches them; the monitoring endpoint gets them in a snapshot).
    pub octets_in: Cell<u64>,
    /// Octets written to them.
    pub octets_out: Cell<u64>,
    /// How many warnings each peer address may still cause ([`ShardContext::may_warn`]).
    pub warnings: RefCell<warnings::WarnLimiter>,
    /// Wakes the task that writes the summaries of suppressed warnings.
    pub warnings_suppressed: Notify,
    /// Connections refused with 421 past `runtime.max_connections`.
    pub refused_capacity: Cell<u64>,
    /// Connections refused with 421 because no descriptor was left to serve them.
    pub refused_descriptors: Cell<u64>,
    /// Accepts that failed for want of a descriptor.
    pub accept_failures: Cell<u64>,
    /// Where a read after a wait lands (`runtime.read_chunk` octets), shared by the shard's
    /// connections: each holds it only within one poll of its read (see `conn::land`), so an
    /// idle connection holds none of it.
    pub landing: RefCell<Vec<u8>>,
}

impl ShardContext {
    /// Carries out what the shard core asks after an input: wakes connection drivers, queues
    /// envelopes for other shards, connects relay links. The core is not borrowed while an
    /// output is carried out.
    pub fn dispatch(self: &Rc<Self>) {
        loop {
            let next = {
                let mut core = self.core.borrow_mut();
                let output = core.poll_output();
                if output.is_none() && core.take_deadline_moved() {
                    self.timer.notify();
                }
                output
            };
            let Some(output) = next else {
                return;
            };
            match output {
                Output::Wake(conn) => {
                    if let Some(wake) = self.wakers.borrow().get(&conn) {
                        wake.notify();
                    }
                }
                Output::ToShard { shard, envelope } => self.post(shard, envelope),
                Output::Connect { domain } => peer::connect(self, domain),
                Output::ResolveRelay { domain } => peer::resolve_relay(self, domain),
                Output::Store(request) => self.store.submit(self.id, request),
            }
        }
    }

    /// Puts the store's latest access table in force, if it changed: one atomic load when
    /// it did not.
    pub fn follow_access(&self) {
        if self.access.generation() != self.access_seen.get() {
            let (generation, table) = self.access.get();
            self.access_seen.set(generation);
            self.core.borrow_mut().set_access(table);
        }
    }

    /// Whether a warning caused by `peer` may be written now: within the address's budget
    /// ([`warnings::WarnLimiter`]). When it may, the count of its warnings left out since the
    /// last one is written first.
    pub fn may_warn(&self, peer: Option<SocketAddr>) -> bool {
        let Some(peer) = peer.map(|p| p.ip()) else {
            return true;
        };
        let verdict = self
            .warnings
            .borrow_mut()
            .check(peer, std::time::Instant::now());
        match verdict {
            warnings::Verdict::Warn { suppressed } => {
                if suppressed > 0 {
                    warn_suppressed(self.id, peer, suppressed);
                }
                true
            }
            warnings::Verdict::Suppress => {
                self.warnings_suppressed.notify();
                false
            }
        }
    }

    /// Puts reloaded settings in force on this shard, for what it does next: sessions,
    /// attachments, binds and open links stay as they are.
    pub fn apply_settings(&self, settings: &Settings) {
        self.routes.replace(settings.routes.clone());
        let mut core = self.core.borrow_mut();
        core.set_link_config(settings.link.clone());
        core.set_budgets(settings.budgets.clone());
        core.set_session_config(settings.session.clone());
        let relay = core.relay_mut();
        relay.set_auth(settings.auth.clone());
        relay.set_trusted(settings.trusted.clone());
        relay.set_hold_limits(settings.hold);
        relay.set_apex_limits(settings.apex);
        relay.set_store_queue(settings.store_queue);
    }

    /// True once shutdown began.
    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Counts `n` octets read from a connection.
    pub fn count_in(&self, n: usize) {
        self.octets_in.set(self.octets_in.get() + n as u64);
    }

    /// Counts `n` octets written to a connection.
    pub fn count_out(&self, n: usize) {
        self.octets_out.set(self.octets_out.get() + n as u64);
    }

    /// Queues `envelope` for shard `to` and wakes its flusher.
    pub fn post(&self, to: usize, envelope: Envelope) {
        if let Some(outbox) = self.outboxes.get(to) {
            if outbox.push(ShardMsg::Relay(envelope)) {
                self.outbox_backlog.add();
            }
        }
    }
}

/// Addresses the relay actually listens on (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// apex-edge address.
    pub edge: SocketAddr,
    /// apex-mesh address.
    pub mesh: SocketAddr,
    /// Shards running.
    pub shards: usize,
}

/// The shortest sleep of the timer task when a timeout it handled is still due (it should not
/// be): a core that keeps asking for time it already had cannot spin the executor.
const TIMER_MIN_SLEEP: Duration = Duration::from_millis(1);

/// How long a port in use is tried again at start (see [`reserve`]).
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Each glommio executor registers its `io_memory` with each of its three io_uring rings (main,
/// latency, poll), and the kernel charges every registration to RLIMIT_MEMLOCK for a process
/// without CAP_IPC_LOCK: VmPin shows 1,536 KiB a shard at the default 512 KiB.
const REGISTRATIONS_PER_SHARD: u64 = 3;

/// Locked memory a shard needs besides its registrations. Measured on Linux 6.18 as an
/// unprivileged user, 1 shard: 512 KiB of io_memory registers within 1,600 KiB and not 1,536;
/// 1 MiB within 3,136 KiB and not 3,100. Below the need glommio does not fail: it warns
/// "registering buffers ... Skipping" and runs slower without registered buffers.
const RING_MEMLOCK_ALLOWANCE: u64 = 64 * 1024;

/// Locked memory `shards` shards need for io_uring with `io_memory` registered bytes each.
fn locked_memory_needed(io_memory: usize, shards: usize) -> u64 {
    shards as u64 * (REGISTRATIONS_PER_SHARD * io_memory as u64 + RING_MEMLOCK_ALLOWANCE)
}

/// Why `limit` (bytes; `None`: unlimited) is too little for `shards` shards, with the fix;
/// `None` when it suffices or does not apply (`exempt`: CAP_IPC_LOCK, which the kernel does
/// not charge).
fn locked_memory_shortfall(
    io_memory: usize,
    shards: usize,
    limit: Option<u64>,
    exempt: bool,
) -> Option<String> {
    let need = locked_memory_needed(io_memory, shards);
    let limit = limit.filter(|limit| !exempt && *limit < need)?;
    Some(format!(
        "locked-memory limit (ulimit -l) is {} KiB but {shards} shard(s) need {} KiB for io_uring \
         (3 x runtime.io_memory + 64 KiB a shard); raise it (`ulimit -l {}` or LimitMEMLOCK= in \
         the systemd unit), or lower `runtime.io_memory` / `--shards`",
        limit / 1024,
        need / 1024,
        need.div_ceil(1024)
    ))
}

/// Refuses to start, with the fix, when io_uring or lockable memory is missing.
pub fn check_environment(config: &Config, shards: usize) -> Result<()> {
    if let Some(why) = sys::io_uring_disabled() {
        bail!("{why}");
    }
    if let Ok(limit) = sys::memlock_limit() {
        let exempt = sys::has_ipc_lock_capability();
        if let Some(why) = locked_memory_shortfall(config.runtime.io_memory, shards, limit, exempt)
        {
            bail!("{why}");
        }
    }
    Ok(())
}

/// Binds a placeholder socket with SO_REUSEPORT to check the address early (privileges, address
/// in use) and to fix an ephemeral port for all shards. Kept open until the shards have bound.
///
/// SO_REUSEPORT would also let a second apexd (or any process of the same user) share the port
/// and silently take half the connections, so an explicit port is first bound without it: if
/// anything else holds the port, that fails and apexd refuses to start.
///
/// A relay that was killed (`kill -9`, a crash) leaves its listeners open for a moment after
/// it is gone: the kernel tears its io_uring instances down, and the sockets with them, after
/// the process has been reaped. So a port in use is tried again for [`PORT_RELEASE_WAIT`]
/// before apexd gives up: a restart right after a crash starts, a live listener still stops it.
fn reserve(addr: SocketAddr, what: &str, flag: &str) -> Result<(socket2::Socket, SocketAddr)> {
    use socket2::{Domain, Socket, Type};
    if addr.port() != 0 {
        let give_up = std::time::Instant::now() + PORT_RELEASE_WAIT;
        loop {
            let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            // Without SO_REUSEPORT a live listener anywhere on the port makes this fail; with
            // SO_REUSEADDR the connections an earlier apexd closed (TIME_WAIT) do not.
            probe.set_reuse_address(true)?;
            match probe.bind(&addr.into()) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if std::time::Instant::now() >= give_up {
                        bail!("the {what} address {addr} is already in use by another process (choose another with {flag})");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => break,
            }
        }
    }
    // SO_REUSEPORT only: with SO_REUSEADDR too, another apexd's probe would pass this bound,
    // not yet listening socket and share the port. TIME_WAIT entries left by an earlier apexd
    // have SO_REUSEPORT (from its listeners), which lets this bind pass them.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    if let Err(e) = socket.bind(&addr.into()) {
        if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 {
            bail!(
                "cannot bind the {what} port {addr}: ports below 1024 need root or CAP_NET_BIND_SERVICE; \
                 choose another with {flag} (for example {flag} 127.0.0.1:{})",
                addr.port() + 9000
            );
        }
        return Err(anyhow!(e).context(format!(
            "cannot bind the {what} address {addr} (change it with {flag})"
        )));
    }
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow!("{what} address is not an IP address"))?;
    Ok((socket, local))
}

/// What [`run`] opens the store with, once the listen addresses are known to be usable: the
/// store and one completion queue per shard.
pub type OpenStore<'a> =
    Box<dyn FnOnce(usize) -> Result<(Store, Vec<flume::Receiver<StoreDone>>)> + 'a>;

/// Runs the relay until SIGINT/SIGTERM (or `stop` is set) and every shard has drained.
/// `open_store` is called once the listen addresses are reserved (a relay that cannot listen
/// creates no files); `on_ready` once every shard listens. `probes` are the shards' queues
/// from the monitoring endpoint, one per shard ([`crate::monitor::Monitor::new`]), or none
/// when it is off. `security` and `settings` are what a reload replaces; every shard follows
/// them. Returns the store, still open.
pub fn run(
    config: Config,
    stop: Arc<AtomicBool>,
    security: Arc<SharedSecurity>,
    settings: Arc<SharedSettings>,
    open_store: OpenStore<'_>,
    probes: Vec<flume::Receiver<Probe>>,
    on_ready: impl FnOnce(Bound),
) -> Result<Store> {
    let shards = config.shard_count();
    if !probes.is_empty() && probes.len() != shards {
        bail!("{} probe queues for {shards} shard(s)", probes.len());
    }
    let probes: Arc<Vec<std::sync::Mutex<Option<flume::Receiver<Probe>>>>> = Arc::new(
        probes
            .into_iter()
            .map(|p| std::sync::Mutex::new(Some(p)))
            .collect(),
    );
    // Every shard's clock starts here, so that times carried between shards compare
    // (delivery latency from acceptance on one shard to the ok on another).
    let epoch = std::time::Instant::now();
    check_environment(&config, shards)?;
    let (_edge_reservation, edge) = reserve(config.edge_listen, "edge", "--edge-listen")?;
    let (_mesh_reservation, mesh_addr) = reserve(config.mesh_listen, "mesh", "--mesh-listen")?;
    let (store, completions) = open_store(shards)?;
    if completions.len() != shards {
        bail!(
            "the store answers {} shard(s) but {shards} are configured",
            completions.len()
        );
    }
    // Held data kept from before a restart goes to each recipient's home shard.
    let held = apex_proto::store::by_home_shard(store.held_at_open(), shards);
    store.forget_held_at_open();
    let completions: Vec<std::sync::Mutex<Option<ShardStoreParts>>> = completions
        .into_iter()
        .zip(held)
        .map(|parts| std::sync::Mutex::new(Some(parts)))
        .collect();
    let completions = Arc::new(completions);
    let mut config = config;
    config.edge_listen = edge;
    config.mesh_listen = mesh_addr;

    let placement = if config.pin {
        if shards > sys_cpus() {
            bail!(
                "--shards {shards} exceeds the {} CPUs available for pinning; use fewer shards or --no-pin",
                sys_cpus()
            );
        }
        PoolPlacement::MaxSpread(shards, None)
    } else {
        PoolPlacement::Unbound(shards)
    };
    let shard_store = store.clone();
    let mesh_plan = (shards > 1).then(|| mesh::plan(shards, config.runtime.mesh_queue));
    let (bound_tx, bound_rx) = mpsc::channel::<Result<()>>();
    let next_index = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pool = LocalExecutorPoolBuilder::new(placement)
        .name("apexd-shard")
        .io_memory(config.runtime.io_memory)
        .ring_depth(config.runtime.ring_depth)
        .on_all_shards({
            let config = config.clone();
            move || {
                let config = config.clone();
                let stop = stop.clone();
                let bound_tx = bound_tx.clone();
                let security = security.clone();
                let settings = settings.clone();
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                let mesh_ends = mesh_plan.as_ref().and_then(|plan| plan.take(index));
                let store = shard_store.clone();
                let parts = completions
                    .get(index)
                    .and_then(|slot| slot.lock().ok().and_then(|mut parts| parts.take()));
                let probe = probes
                    .get(index)
                    .and_then(|slot| slot.lock().ok().and_then(|mut probe| probe.take()));
                async move {
                    let Some((completion, held)) = parts else {
                        bail!("shard {index} has no store completion queue");
                    };
                    let shard_store = ShardStore {
                        store,
                        completion,
                        held,
                    };
                    let start = ShardStart {
                        id: index,
                        epoch,
                        probe,
                    };
                    shard_main(
                        start,
                        config,
                        stop,
                        Reloadables { security, settings },
                        shard_store,
                        bound_tx,
                        mesh_ends,
                    )
                    .await
                }
            }
        })
        .map_err(|e| anyhow!("cannot start the shard executors: {e}. {}", glommio_hint()))?;

    for _ in 0..shards {
        match bound_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("a shard did not start within 30 s"),
        }
    }
    on_ready(Bound {
        edge,
        mesh: mesh_addr,
        shards,
    });
    let mut failed = None;
    for result in pool.join_all() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(e) => failed = Some(anyhow!("shard failed: {e}")),
        }
    }
    failed.map_or(Ok(store), Err)
}

fn sys_cpus() -> usize {
    crate::config::online_cpus()
}

fn glommio_hint() -> &'static str {
    "apexd needs io_uring (Linux 5.8 or later, not disabled by kernel.io_uring_disabled) and \
     enough locked memory (ulimit -l; see runtime.io_memory)"
}

/// A shard's end of the store: where its requests go, where its answers come from, and the
/// held data it holds again after a restart.
struct ShardStore {
    store: Store,
    completion: flume::Receiver<StoreDone>,
    held: Vec<(HoldId, HeldMessage)>,
}

/// What [`run`] hands each shard of the store: its answers and its held data.
type ShardStoreParts = (flume::Receiver<StoreDone>, Vec<(HoldId, HeldMessage)>);

/// What a reload replaces, which every shard follows.
struct Reloadables {
    security: Arc<SharedSecurity>,
    settings: Arc<SharedSettings>,
}

/// What a shard starts with besides its configuration, security, store and mesh ends.
struct ShardStart {
    id: usize,
    /// The instant every shard's clock counts from.
    epoch: std::time::Instant,
    /// Its queue from the monitoring endpoint, when that is on.
    probe: Option<flume::Receiver<Probe>>,
}

async fn shard_main(
    start: ShardStart,
    config: Config,
    stop: Arc<AtomicBool>,
    reloadables: Reloadables,
    shard_store: ShardStore,
    bound_tx: mpsc::Sender<Result<()>>,
    mesh_ends: Option<mesh::ShardEnds>,
) -> Result<()> {
    let ShardStart { id, epoch, probe } = start;
    let backlog = config.runtime.listen_backlog;
    let listeners = sys::listen(config.edge_listen, backlog)
        .map_err(|e| anyhow!("binding edge {}: {e}", config.edge_listen))
        .and_then(|edge| {
            sys::listen(config.mesh_listen, backlog)
                .map_err(|e| anyhow!("binding mesh {}: {e}", config.mesh_listen))
                .map(|mesh| (edge, mesh))
        });
    let ((edge, edge_handle), (mesh_listener, mesh_handle)) = match listeners {
        Ok(l) => {
            let _ = bound_tx.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = bound_tx.send(Err(e));
            return Ok(());
        }
    };
    let limits = Limits::from(&config.limits);
    let mut mesh = match mesh_ends {
        Some(ends) => Some(ShardMesh::join(ends).await),
        None if config.shard_count() > 1 => bail!("shard {id} has no place in the shard mesh"),
        None => None,
    };
    let receivers = mesh
        .as_mut()
        .map(ShardMesh::take_receivers)
        .unwrap_or_default();
    let shard_count = config.shard_count();
    let ShardStore {
        store,
        completion,
        held,
    } = shard_store;
    let access = store.access();
    let (access_generation, access_table) = access.get();
    let relay = Relay::new(RelayConfig {
        domain: config.domain.clone(),
        shard: id,
        shards: config.shard_count(),
        limits: (&config.apex).into(),
        access: access_table,
        trusted: config.mesh.trusted.clone(),
        hold: (&config.hold).into(),
        store_queue: config.runtime.store_queue,
        report_watch: config.report_watch(),
        auth: AuthPolicy {
            mode: config.auth_mode()?,
            relay_addresses: FxHashMap::default(),
        },
    });
    let outbox_limit = config.runtime.mesh_queue;
    let session_config = SessionConfig {
        profiles: vec![APEX_PROFILE.to_owned()],
        limits,
        ..SessionConfig::default()
    };
    let mut core = ShardCore::new(
        relay,
        id,
        shard_count,
        session_config,
        config.budgets(),
        epoch,
    );
    let Reloadables { security, settings } = reloadables;
    // The settings in force may be newer than `config` when a reload came before the shard
    // started. Read before security, applied after it (see `follow_reload`).
    let (settings_seen, settings_in_force) = settings.get();
    let (security_seen, in_force) = security.get();
    core.set_security(in_force);
    let warn_limits = warnings::WarnLimits::from(&config.warnings);
    let read_chunk = config.runtime.read_chunk;
    let ctx = Rc::new(ShardContext {
        id,
        config,
        shutdown: Semaphore::new(0),
        connections: Cell::new(0),
        core: RefCell::new(core),
        wakers: RefCell::new(FxHashMap::default()),
        timer: Notify::default(),
        mesh,
        routes: RefCell::default(),
        stopping: Cell::new(false),
        outboxes: (0..shard_count)
            .map(|_| outbox::Outbox::new(outbox_limit))
            .collect(),
        outbox_backlog: notify::Backlog::default(),
        store,
        access,
        access_seen: Cell::new(access_generation),
        octets_in: Cell::new(0),
        octets_out: Cell::new(0),
        warnings: RefCell::new(warnings::WarnLimiter::new(warn_limits)),
        warnings_suppressed: Notify::default(),
        refused_capacity: Cell::new(0),
        refused_descriptors: Cell::new(0),
        accept_failures: Cell::new(0),
        landing: RefCell::new(vec![0; read_chunk]),
    });
    ctx.core
        .borrow_mut()
        .set_conn_limits(ctx.config.conn_limits(), std::time::Instant::now());
    ctx.apply_settings(&settings_in_force);
    // Held data the store kept from before a restart, for the endpoints whose home is here.
    if !held.is_empty() {
        info!(
            shard = id,
            held = held.len(),
            "holding data kept from before the restart"
        );
        ctx.core
            .borrow_mut()
            .restore_held(held, std::time::Instant::now());
        ctx.dispatch();
    }
    glommio::spawn_local(follow_store(ctx.clone(), completion)).detach();
    if let Some(probe) = probe {
        glommio::spawn_local(answer_probes(ctx.clone(), probe)).detach();
    }
    if ctx.mesh.is_some() {
        for peer in (0..shard_count).filter(|p| *p != id) {
            glommio::spawn_local(flush_outbox(ctx.clone(), peer)).detach();
        }
    }
    for (peer, receiver) in receivers {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(ShardMsg::Relay(envelope)) = receiver.recv().await {
                tracing::trace!(peer, ?envelope, "envelope from shard");
                ctx.follow_access();
                ctx.core
                    .borrow_mut()
                    .handle_envelope(envelope, std::time::Instant::now());
                ctx.dispatch();
            }
        })
        .detach();
    }

    glommio::spawn_local(run_timer(ctx.clone())).detach();
    glommio::spawn_local(summarise_warnings(ctx.clone())).detach();
    glommio::spawn_local(follow_reload(
        ctx.clone(),
        Reloadables { security, settings },
        security_seen,
        settings_seen,
    ))
    .detach();
    let edge_task = glommio::spawn_local(accept_loop(
        (edge, edge_handle),
        ctx.clone(),
        ConnKind::Edge,
    ));
    let mesh_task = glommio::spawn_local(accept_loop(
        (mesh_listener, mesh_handle),
        ctx.clone(),
        ConnKind::Mesh,
    ));
    info!(shard = id, edge = %ctx.config.edge_listen, mesh = %ctx.config.mesh_listen, "shard listening");

    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    info!(
        shard = id,
        connections = ctx.connections.get(),
        "shutting down"
    );
    ctx.stopping.set(true);
    // Links take no more data; what they queued is reported. Their connections are
    // released below like every other one.
    ctx.core.borrow_mut().stop_links(std::time::Instant::now());
    ctx.dispatch();
    ctx.outbox_backlog.wake_all();
    ctx.shutdown.close();
    edge_task.await;
    mesh_task.await;
    // Sessions get the grace period to answer our close, plus a margin to flush.
    let deadline =
        std::time::Instant::now() + Duration::from_millis(ctx.config.shutdown_grace_ms + 500);
    while ctx.connections.get() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if ctx.connections.get() > 0 {
        warn!(
            shard = id,
            left = ctx.connections.get(),
            "connections still open at exit"
        );
    }
    Ok(())
}

/// Sends the envelopes queued for `peer`, in order, waiting while its queue is full. The only
/// task that sends to `peer`, so order is kept and no other task ever waits on a full queue.
/// The core's timers (held data expires, stalled recipients refuse, links back off and give
/// up waiting for a close): sleeps until the core's next timeout, and sleeps again when an
/// earlier one appears ([`ShardContext::dispatch`] wakes it). An idle shard does not wake.
/// Applies a reload (SIGHUP) to this shard: checks for one once a second (two atomic loads,
/// not a wake-up per message), and puts the new security configuration and settings in force.
/// The settings' generation is read first: the reload publishes security before settings, so
/// settings are never applied with older security (a link's TLS follows both).
async fn follow_reload(
    ctx: Rc<ShardContext>,
    reloadables: Reloadables,
    mut security_seen: u64,
    mut settings_seen: u64,
) {
    let Reloadables { security, settings } = reloadables;
    while !ctx.stopping() {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        let settings_changed = settings.generation() != settings_seen;
        if security.generation() != security_seen {
            let (generation, in_force) = security.get();
            security_seen = generation;
            ctx.core.borrow_mut().set_security(in_force);
        }
        if settings_changed {
            let (generation, in_force) = settings.get();
            settings_seen = generation;
            ctx.apply_settings(&in_force);
            tracing::debug!(target: "apexd::reload", shard = ctx.id, generation, "settings in force");
            // Timers measured against the old settings are looked at again.
            ctx.dispatch();
        }
    }
}

/// Answers the monitoring endpoint's probes with snapshots of this shard's counts. A snapshot
/// walks the shard's sessions and directory: a scrape's cost, paid between two of the shard's
/// tasks, never on a message's path.
async fn answer_probes(ctx: Rc<ShardContext>, probes: flume::Receiver<Probe>) {
    while let Ok(probe) = probes.recv_async().await {
        match probe {
            Probe::Report(reply) => {
                let report = ShardReport {
                    core: ctx.core.borrow().snapshot(),
                    octets_in: ctx.octets_in.get(),
                    octets_out: ctx.octets_out.get(),
                    shard_queue_overflows: ctx.outbox_backlog.overflows(),
                    refused_capacity: ctx.refused_capacity.get(),
                    refused_descriptors: ctx.refused_descriptors.get(),
                    accept_failures: ctx.accept_failures.get(),
                };
                let _ = reply.try_send((ctx.id, report));
            }
            Probe::Endpoints { limit, reply } => {
                let core = ctx.core.borrow();
                let mut list = EndpointList::default();
                for (endpoint, at) in core.relay().attached_here() {
                    list.total += 1;
                    if list.endpoints.len() < limit {
                        list.endpoints
                            .push((endpoint.to_string(), at.conn.raw(), at.channel));
                    }
                }
                let _ = reply.try_send((ctx.id, list));
            }
            Probe::Links(reply) => {
                let core = ctx.core.borrow();
                let list = LinkList {
                    links: core
                        .links()
                        .into_iter()
                        .map(|(domain, state, queued)| (domain.to_owned(), state.name(), queued))
                        .collect(),
                    bound: core
                        .relay()
                        .bound_relays()
                        .into_iter()
                        .map(|(domain, conn)| (domain.to_owned(), conn.raw()))
                        .collect(),
                };
                let _ = reply.try_send((ctx.id, list));
            }
        }
    }
}

/// Hands the store's answers to the core: what waited for durability goes on.
async fn follow_store(ctx: Rc<ShardContext>, completion: flume::Receiver<StoreDone>) {
    while let Ok(done) = completion.recv_async().await {
        // The store publishes an access change before it answers: in force before the answer
        // (a `set`'s 250) goes out.
        ctx.follow_access();
        ctx.core
            .borrow_mut()
            .store_done(done, std::time::Instant::now());
        ctx.dispatch();
    }
}

fn warn_suppressed(shard: usize, peer: std::net::IpAddr, suppressed: u64) {
    warn!(
        shard,
        %peer,
        suppressed,
        "suppressed {suppressed} similar warnings from {peer}"
    );
}

/// Writes the summaries of the warnings [`ShardContext::may_warn`] left out, one interval
/// after the first of them. Sleeps while nothing is suppressed.
async fn summarise_warnings(ctx: Rc<ShardContext>) {
    let stop = || async {
        let _ = ctx.shutdown.acquire(1).await;
    };
    while !ctx.stopping() {
        let due = ctx.warnings.borrow().poll_timeout();
        match due {
            Some(at) => {
                let wait = at.saturating_duration_since(std::time::Instant::now());
                futures_lite::future::or(glommio::timer::sleep(wait), stop()).await;
            }
            None => futures_lite::future::or(ctx.warnings_suppressed.notified(), stop()).await,
        }
        let now = std::time::Instant::now();
        loop {
            let summary = ctx.warnings.borrow_mut().poll_summary(now);
            let Some((peer, suppressed)) = summary else {
                break;
            };
            warn_suppressed(ctx.id, peer, suppressed);
        }
    }
}

async fn run_timer(ctx: Rc<ShardContext>) {
    while !ctx.stopping() {
        let now = std::time::Instant::now();
        let due = ctx.core.borrow().poll_timeout();
        match due {
            Some(at) if at <= now => {
                ctx.core.borrow_mut().handle_timeout(now);
                ctx.dispatch();
                if ctx
                    .core
                    .borrow()
                    .poll_timeout()
                    .is_some_and(|again| again <= now)
                {
                    glommio::timer::sleep(TIMER_MIN_SLEEP).await;
                }
            }
            Some(at) => {
                futures_lite::future::or(glommio::timer::sleep(at - now), async {
                    futures_lite::future::or(ctx.timer.notified(), async {
                        let _ = ctx.shutdown.acquire(1).await;
                    })
                    .await;
                })
                .await;
            }
            None => {
                futures_lite::future::or(ctx.timer.notified(), async {
                    let _ = ctx.shutdown.acquire(1).await;
                })
                .await;
            }
        }
    }
}

async fn flush_outbox(ctx: Rc<ShardContext>, peer: usize) {
    let Some(mesh) = ctx.mesh.as_ref() else {
        return;
    };
    loop {
        let (next, relieved) = ctx.outboxes[peer].pop();
        if relieved {
            ctx.outbox_backlog.remove();
        }
        let Some(msg) = next else {
            if ctx.stopping() {
                return;
            }
            futures_lite::future::or(ctx.outboxes[peer].pushed(), async {
                let _ = ctx.shutdown.acquire(1).await;
            })
            .await;
            continue;
        };
        let sent = match mesh.try_send(peer, msg) {
            Err(mesh::Refused::Full(msg)) => mesh.send(peer, msg).await,
            other => other,
        };
        if let Err(refused) = sent {
            tracing::error!(
                shard = ctx.id,
                peer,
                ?refused,
                "shard queue refused an envelope"
            );
        }
    }
}

/// Accepts connections on one port and spawns a driver for each, until shutdown. An accept that
/// fails is tried again after a wait that doubles up to `runtime.accept_backoff_max_ms`, and
/// logged once per `warnings.interval_ms` with the count of failures left out. With no
/// descriptor left, the connections waiting in the kernel are answered 421 from the spare
/// descriptor ([`accept::SpareDescriptor`]) instead of hanging there (issue 19 item 11).
async fn accept_loop(
    (listener, handle): (TcpListener, socket2::Socket),
    ctx: Rc<ShardContext>,
    kind: ConnKind,
) {
    enum Accepted {
        Stream(std::io::Result<glommio::net::TcpStream>),
        Stop,
    }
    let mut pressure = accept::AcceptPressure::new(
        Duration::from_millis(ctx.config.runtime.accept_backoff_max_ms),
        Duration::from_millis(ctx.config.warnings.interval_ms),
    );
    let mut spare = accept::SpareDescriptor::open();
    let refusal = accept::refusal();
    let keepalive = Duration::from_millis(ctx.config.runtime.tcp_keepalive_ms);
    let port = match kind {
        ConnKind::Edge => "edge",
        ConnKind::Mesh => "mesh",
    };
    loop {
        let next = futures_lite::future::or(
            async { Accepted::Stream(listener.accept().await.map_err(std::io::Error::from)) },
            async {
                let _ = ctx.shutdown.acquire(1).await;
                Accepted::Stop
            },
        )
        .await;
        match next {
            Accepted::Stop => return,
            Accepted::Stream(Err(e)) => {
                let mut refused = 0;
                if sys::out_of_descriptors(&e) {
                    ctx.accept_failures.set(ctx.accept_failures.get() + 1);
                    let answered = spare.release(|| {
                        sys::refuse_waiting(&handle, &refusal, accept::MAX_REFUSALS_PER_ROUND)
                    });
                    refused = match answered {
                        Some(Ok(n)) => n,
                        _ => 0,
                    };
                    ctx.refused_descriptors
                        .set(ctx.refused_descriptors.get() + refused as u64);
                }
                let after = pressure.failed(std::time::Instant::now());
                if let Some(suppressed) = after.log {
                    warn!(
                        shard = ctx.id,
                        port,
                        error = %e,
                        refused,
                        suppressed,
                        wait_ms = after.wait.as_millis() as u64,
                        "accept failed ({suppressed} similar failures left out of the log since the last)"
                    );
                }
                futures_lite::future::or(glommio::timer::sleep(after.wait), async {
                    let _ = ctx.shutdown.acquire(1).await;
                })
                .await;
            }
            Accepted::Stream(Ok(stream)) => {
                if let Some(suppressed) = pressure.succeeded() {
                    warn!(
                        shard = ctx.id,
                        port,
                        suppressed,
                        "accepting again ({suppressed} failures left out of the log)"
                    );
                }
                if !keepalive.is_zero() {
                    let _ = sys::set_keepalive(sys::StreamFd::as_fd(&stream), keepalive);
                }
                let ctx = ctx.clone();
                ctx.connections.set(ctx.connections.get() + 1);
                glommio::spawn_local(async move {
                    conn::drive(stream, ctx.clone(), kind).await;
                    ctx.connections.set(ctx.connections.get() - 1);
                })
                .detach();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn too_little_locked_memory_is_refused_with_the_fix() {
        // The measured edges (see RING_MEMLOCK_ALLOWANCE): 1,536 KiB is short for one shard at
        // 512 KiB, 1,600 KiB is enough; 8 MiB holds 5 shards, not 6.
        let kib = |n: u64| Some(n * 1024);
        let short = locked_memory_shortfall(512 * 1024, 1, kib(1536), false).unwrap();
        assert!(
            short.contains("is 1536 KiB")
                && short.contains("need 1600 KiB")
                && short.contains("`ulimit -l 1600`")
                && short.contains("runtime.io_memory"),
            "{short}"
        );
        assert_eq!(
            locked_memory_shortfall(512 * 1024, 1, kib(1600), false),
            None
        );
        assert_eq!(
            locked_memory_shortfall(1024 * 1024, 1, kib(3136), false),
            None
        );
        assert!(locked_memory_shortfall(1024 * 1024, 1, kib(3100), false).is_some());
        assert_eq!(
            locked_memory_shortfall(512 * 1024, 5, kib(8192), false),
            None
        );
        assert!(locked_memory_shortfall(512 * 1024, 6, kib(8192), false).is_some());
        // Unlimited, or CAP_IPC_LOCK (not charged): nothing to refuse.
        assert_eq!(locked_memory_shortfall(512 * 1024, 64, None, false), None);
        assert_eq!(locked_memory_shortfall(512 * 1024, 64, kib(64), true), None);
        // And check_environment applies it to this process.
        let mut config = Config::load(None, &Overrides::default()).unwrap();
        if let Ok(Some(limit)) = sys::memlock_limit() {
            if !sys::has_ipc_lock_capability() {
                config.runtime.io_memory = limit as usize;
                let err = check_environment(&config, 2).unwrap_err().to_string();
                assert!(err.contains("ulimit -l"), "{err}");
            }
        }
        config.runtime.io_memory = 64 * 1024;
        assert!(check_environment(&config, 1).is_ok());
    }

    /// A second apexd starting while the first holds its reservation (bound, shards not yet
    /// listening) is refused, instead of sharing the port through SO_REUSEPORT.
    #[test]
    fn a_port_reserved_by_a_starting_relay_is_refused() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let (_first, reserved) = reserve(addr, "edge", "--edge-listen").unwrap();
        assert_eq!(reserved, addr);
        let err = reserve(addr, "edge", "--edge-listen")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already in use"), "{err}");
    }
}
