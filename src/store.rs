//! The relay's durable store: the file `DATA_DIR/apexd.redb` and the thread `apexd-store`
//! that alone writes it.
//!
//! What a change does is decided by the protocol core (`apex_proto::store::StoreState`); this
//! module owns only where the result lives and when it counts as durable. Shards hand
//! [`StoreRequest`]s to [`Store::submit`] (never blocking); the store thread takes everything
//! queued, applies it to its one [`StoreState`], writes every resulting [`Mutation`] in one
//! redb write transaction (group commit: one fsync for many requests) and only after that
//! commit answers each request with a [`StoreDone`] on its shard's completion channel and, when
//! access entries changed, publishes a new access table to every shard through
//! [`SharedAccess`]. Nothing is acknowledged or published before it is on disk.
//!
//! It does not decide anything about access or holds, does not read the configuration (the
//! caller passes the directory, grants and limits) and never touches a shard's state.
//!
//! Records, keyed as `Mutation::key` says:
//!
//! ```text
//! meta    &str  -> u64    "format_version" = apex_proto::store::FORMAT_VERSION
//! access  &[u8] -> &[u8]  owner NUL actor -> actions NUL lastUpdate
//! held    u64   -> &[u8]  hold id -> the held message
//! ```

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use apex_proto::apex::access::AccessTable;
use apex_proto::apex::timestamp::Timestamp;
use apex_proto::store::{
    AccessLimits, HeldMessage, HoldId, Mutation, Outcome, StoreDone, StoreFailure, StoreRequest,
    StoreState, FORMAT_VERSION,
};
use arc_swap::ArcSwap;
use redb::{
    Database, DatabaseError, Durability, ReadableTable, StorageError, TableDefinition, TableHandle,
};

/// The database file's name inside the data directory.
pub const FILE_NAME: &str = "apexd.redb";

/// Most requests committed in one transaction: bounds the time one commit takes and the
/// memory a batch holds, while still folding a burst into few fsyncs.
pub const MAX_BATCH: usize = 1024;

const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const ACCESS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("access");
const HELD: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("held");
const FORMAT_KEY: &str = "format_version";

/// redb's page cache. The store reads the file only at open (the state is served from
/// memory), so redb's default of 1 GiB would only waste memory; a tenth of this buffers a
/// batch's pages before they are written.
const CACHE_BYTES: usize = 32 << 20;

/// The access table every shard reads: replaced as a whole after each commit that changed it.
#[derive(Debug)]
pub struct SharedAccess {
    table: ArcSwap<AccessTable>,
    generation: AtomicU64,
}

impl SharedAccess {
    /// Starts with `table` at generation 1.
    pub fn new(table: AccessTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
            generation: AtomicU64::new(1),
        }
    }

    /// The generation in force; it grows after each publish.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The generation and the table. The generation is read first: since a publish swaps the
    /// table before it bumps the generation, the table returned is at least as new as the
    /// generation says (at worst a reader sees a newer table under an older number, and takes
    /// it again once it notices the bump).
    pub fn get(&self) -> (u64, Arc<AccessTable>) {
        let generation = self.generation();
        (generation, self.table.load_full())
    }

    /// Puts `table` in force, then bumps the generation (Release: whoever sees the new number
    /// also sees the new table).
    fn publish(&self, table: AccessTable) {
        self.table.store(Arc::new(table));
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// What the store thread is asked to do, in queue order.
enum Command {
    Request { shard: usize, request: StoreRequest },
    SetGrants(AccessTable),
    Close,
}

/// The durable store: a handle on the store thread. Cheap to clone; the thread stops when
/// [`Store::close`] is called or the last handle is dropped, after committing what was queued.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once closed. Sending under the read lock and closing under the write lock means
    /// no request can slip in behind `Close` and go unanswered.
    queue: RwLock<Option<flume::Sender<Command>>>,
    /// The shards' completion senders, to answer requests the thread can no longer take.
    done: Vec<flume::Sender<StoreDone>>,
    access: Arc<SharedAccess>,
    commits: Arc<AtomicU64>,
    /// Commit failures and write latencies (the store thread's; a lock per batch, never a
    /// shard's).
    stats: Arc<Mutex<WriteStats>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Kept (with their payloads) until the runtime says it took them.
    held_at_open: Mutex<Vec<(HoldId, HeldMessage)>>,
    opened_ms: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("commits", &self.commits())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if missing, mode 0700 dir / 0600 file) `dir/apexd.redb`; reads every
    /// record into a [`StoreState`] whose access table starts from `grants` (configuration
    /// grants, not stored); starts the store thread `apexd-store`. Returns the store and one
    /// completion receiver per shard (it stays open while the store lives: after
    /// [`Store::close`], requests are answered on it with a failure).
    ///
    /// A file this apexd cannot read (a newer format, damage, a record that does not decode)
    /// is an error naming it: starting empty would silently drop what it holds.
    pub fn open(
        dir: &Path,
        grants: AccessTable,
        limits: AccessLimits,
        shards: usize,
    ) -> Result<(Store, Vec<flume::Receiver<StoreDone>>)> {
        if shards == 0 {
            bail!("the store needs at least one shard to answer");
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "cannot create the data directory {} (set `data_dir` or --data-dir to a \
                     directory apexd's user may create or write)",
                    dir.display()
                )
            })?;
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| open_error(&path, e))?;
        let (db, state) = open_database(&path, Some(file), grants.clone(), limits)?;
        let opened_ms = now_millis();
        let held_at_open = state.held(Timestamp::from_unix_millis(opened_ms));
        tracing::info!(
            path = %path.display(),
            access_entries = state.access_entries(),
            held_messages = state.held_messages(),
            "store opened"
        );

        let access = Arc::new(SharedAccess::new(state.access().clone()));
        let commits = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(Mutex::new(WriteStats::default()));
        let (queue, requests) = flume::unbounded();
        let (done, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| flume::unbounded()).unzip();
        let worker = Worker {
            path: path.clone(),
            db: Some(db),
            state: Some(state),
            grants,
            limits,
            grants_changed: false,
            access: access.clone(),
            done: done.clone(),
            commits: commits.clone(),
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("apexd-store".into())
            .spawn(move || worker.run(requests))
            .context("cannot start the store thread")?;
        let inner = Inner {
            path,
            queue: RwLock::new(Some(queue)),
            done,
            access,
            commits,
            stats,
            thread: Mutex::new(Some(thread)),
            held_at_open: Mutex::new(held_at_open),
            opened_ms,
        };
        Ok((
            Store {
                inner: Arc::new(inner),
            },
            receivers,
        ))
    }

    /// Queues a request from `shard`. Never blocks: the queue is unbounded, and the core bounds
    /// what it asks. After [`Store::close`] the request is answered with a failure at once.
    pub fn submit(&self, shard: usize, request: StoreRequest) {
        if shard >= self.inner.done.len() {
            tracing::error!(
                shard,
                shards = self.inner.done.len(),
                "store request from a shard that does not exist"
            );
            return;
        }
        let queue = match self.inner.queue.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(queue) = queue.as_ref() else {
            self.inner.refuse(shard, request.token);
            return;
        };
        // The send fails only when the thread is gone, which it is not before close; the
        // request is then answered rather than lost.
        if let Err(flume::SendError(Command::Request { shard, request })) =
            queue.send(Command::Request { shard, request })
        {
            self.inner.refuse(shard, request.token);
        }
    }

    /// The access table every shard reads.
    pub fn access(&self) -> Arc<SharedAccess> {
        self.inner.access.clone()
    }

    /// The held messages found at open, oldest first, each with the time it may still wait as
    /// of now. The list is kept until [`Store::forget_held_at_open`].
    pub fn held_at_open(&self) -> Vec<(HoldId, HeldMessage)> {
        let elapsed = u64::try_from(now_millis().saturating_sub(self.inner.opened_ms)).unwrap_or(0);
        let held = match self.inner.held_at_open.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        held.iter()
            .map(|(id, message)| {
                let mut message = message.clone();
                message.remaining_ms = message.remaining_ms.map(|ms| ms.saturating_sub(elapsed));
                (*id, message)
            })
            .collect()
    }

    /// Drops the list [`Store::held_at_open`] returns, so that the payloads of messages
    /// released since are freed (the store's own state keeps only those still held).
    pub fn forget_held_at_open(&self) {
        match self.inner.held_at_open.lock() {
            Ok(mut guard) => *guard = Vec::new(),
            Err(poisoned) => *poisoned.into_inner() = Vec::new(),
        }
    }

    /// Replaces the configuration grants (a reload) and publishes the table. Returns at once;
    /// the store thread publishes after whatever was queued before it.
    pub fn set_grants(&self, grants: AccessTable) {
        let queue = match self.inner.queue.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(queue) = queue.as_ref() {
            let _ = queue.send(Command::SetGrants(grants));
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Write transactions committed since open (a batch with nothing to write commits none).
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Acquire)
    }

    /// The file's size, commits, failures and write latencies.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            file_octets: std::fs::metadata(&self.inner.path).map_or(0, |m| m.len()),
            commits: self.commits(),
            writes: self
                .inner
                .stats
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
        }
    }

    /// Stops the thread after committing (and answering) what was queued; waits for it. Later
    /// requests are answered with a failure. Also done when the last handle is dropped.
    pub fn close(&self) {
        self.inner.close();
    }
}

impl Inner {
    fn refuse(&self, shard: usize, token: u64) {
        if token == 0 {
            return;
        }
        if let Some(done) = self.done.get(shard) {
            let _ = done.send(StoreDone {
                token,
                result: Err(StoreFailure(format!(
                    "{} is closed: apexd is stopping",
                    self.path.display()
                ))),
            });
        }
    }

    fn close(&self) {
        let queue = match self.queue.write() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(queue) = queue {
            let _ = queue.send(Command::Close);
        }
        let thread = match self.thread.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(thread) = thread else {
            return;
        };
        if thread.join().is_err() {
            tracing::error!(path = %self.path.display(), "the store thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

/// The store thread's state: the database and the state as last committed (plus, while a
/// batch is being written, that batch).
struct Worker {
    path: PathBuf,
    /// `None` after a failed commit until the file could be opened again.
    db: Option<Database>,
    /// `None` exactly when `db` is.
    state: Option<StoreState>,
    grants: AccessTable,
    limits: AccessLimits,
    /// Grants were replaced and the table not yet published.
    grants_changed: bool,
    access: Arc<SharedAccess>,
    done: Vec<flume::Sender<StoreDone>>,
    commits: Arc<AtomicU64>,
    stats: Arc<Mutex<WriteStats>>,
}

/// How the store's writes went, for metrics.
#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    /// Batches whose commit failed.
    pub failures: u64,
    /// How long each committed transaction took to write and make durable.
    pub latency: apex_proto::stats::Latency,
}

/// The store as metrics show it.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Size of the database file in octets.
    pub file_octets: u64,
    /// Transactions committed since open.
    pub commits: u64,
    /// Commit failures and write latencies.
    pub writes: WriteStats,
}

impl Worker {
    fn run(mut self, commands: flume::Receiver<Command>) {
        // Blocks until there is work; then takes whatever else is queued, up to MAX_BATCH
        // requests, so that a burst costs one commit. Ends at Close, or when every handle is
        // gone (the queue then holds nothing more).
        while let Ok(first) = commands.recv() {
            let mut batch = Vec::new();
            let mut closing = false;
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Request { shard, request } => batch.push((shard, request)),
                    Command::SetGrants(grants) => self.set_grants(grants),
                    Command::Close => {
                        closing = true;
                        break;
                    }
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                next = commands.try_recv().ok();
            }
            if !batch.is_empty() {
                self.commit_batch(batch);
            }
            if self.grants_changed {
                self.publish();
            }
            if closing {
                break;
            }
        }
        tracing::debug!(path = %self.path.display(), "store thread stopped");
    }

    fn set_grants(&mut self, grants: AccessTable) {
        if let Some(state) = &mut self.state {
            state.set_grants(grants.clone());
        }
        self.grants = grants;
        self.grants_changed = true;
    }

    /// Publishes the access table in force: the state's, or, while the file cannot be opened,
    /// the last published entries under the current grants.
    fn publish(&mut self) {
        let table = match &self.state {
            Some(state) => state.access().clone(),
            None => {
                let (_, published) = self.access.get();
                let mut state = StoreState::new((*published).clone(), self.limits);
                state.set_grants(self.grants.clone());
                state.access().clone()
            }
        };
        self.access.publish(table);
        self.grants_changed = false;
    }

    fn commit_batch(&mut self, batch: Vec<(usize, StoreRequest)>) {
        if self.state.is_none() {
            if let Err(failure) = self.reopen() {
                self.answer_failure(batch, &failure);
                return;
            }
        }
        let (Some(db), Some(state)) = (&self.db, &mut self.state) else {
            return;
        };
        // One instant for the batch: StoreState keeps each entry's lastUpdate increasing.
        let now = Timestamp::from_unix_millis(now_millis());
        let mut mutations = Vec::new();
        let mut access_changed = false;
        let mut answers = Vec::with_capacity(batch.len());
        for (shard, request) in batch {
            let mut outcomes = Vec::with_capacity(request.ops.len());
            for op in request.ops {
                let (outcome, mutation) = state.apply(op, now);
                if let Some(mutation) = mutation {
                    access_changed |= matches!(mutation, Mutation::Access { .. });
                    mutations.push(mutation);
                }
                outcomes.push(outcome);
            }
            answers.push((shard, request.token, outcomes));
        }
        if !mutations.is_empty() {
            // redb is not expected to panic, but a panic here must not take the relay's
            // store down with it: it is treated as a failed commit.
            let started = std::time::Instant::now();
            let written = catch_unwind(AssertUnwindSafe(|| write(db, &mutations)))
                .unwrap_or_else(|_| Err(anyhow!("the database library panicked")));
            if let Err(e) = written {
                let failure =
                    StoreFailure(format!("cannot commit to {}: {e:#}", self.path.display()));
                if let Ok(mut stats) = self.stats.lock() {
                    stats.failures += 1;
                }
                tracing::error!("{failure}; the batch's requests fail");
                // The state now holds the batch, which is not on disk: go back to what is
                // committed by reading the file again. (The alternative, applying each batch
                // to a copy of the state, would copy every access entry and held message on
                // every commit to save work only on failures; and redb refuses all further
                // use of a database that saw an I/O error, so it must be opened again anyway.)
                // While the disk stays full, each batch pays for a reopen (redb then checks
                // the file): the price of never answering from a state that is not on disk.
                if let Err(reopen) = self.reopen() {
                    tracing::error!("{reopen}; will try again with the next request");
                }
                for (shard, token, _) in answers {
                    self.send(shard, token, Err(failure.clone()));
                }
                return;
            }
            self.commits.fetch_add(1, Ordering::Release);
            if let Ok(mut stats) = self.stats.lock() {
                stats.latency.record(started.elapsed().as_micros() as u64);
            }
        }
        if access_changed || self.grants_changed {
            self.publish();
        }
        for (shard, token, outcomes) in answers {
            self.send(shard, token, Ok(outcomes));
        }
    }

    /// Opens the file again and reads the state as committed (after a failed commit).
    fn reopen(&mut self) -> std::result::Result<(), StoreFailure> {
        self.db = None;
        self.state = None;
        // Not created or initialized here: a file that disappeared or was emptied must not
        // come back as an empty store.
        let (db, state) = open_database(&self.path, None, self.grants.clone(), self.limits)
            .map_err(|e| StoreFailure(format!("{e:#}")))?;
        tracing::info!(path = %self.path.display(), "store reopened after a failed commit");
        self.db = Some(db);
        self.state = Some(state);
        if self.grants_changed {
            self.publish();
        }
        Ok(())
    }

    fn answer_failure(&self, batch: Vec<(usize, StoreRequest)>, failure: &StoreFailure) {
        for (shard, request) in batch {
            self.send(shard, request.token, Err(failure.clone()));
        }
    }

    fn send(
        &self,
        shard: usize,
        token: u64,
        result: std::result::Result<Vec<Outcome>, StoreFailure>,
    ) {
        if token == 0 {
            return;
        }
        match self.done.get(shard) {
            // A shard that stopped reading is gone; its answers have no one to go to.
            Some(done) => {
                let _ = done.send(StoreDone { token, result });
            }
            None => tracing::error!(shard, token, "store answer for a shard that does not exist"),
        }
    }
}

/// Writes `mutations` in one transaction and commits it durably (fsync before return).
fn write(db: &Database, mutations: &[Mutation]) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    {
        let mut access = txn.open_table(ACCESS)?;
        let mut held = txn.open_table(HELD)?;
        for mutation in mutations {
            match mutation {
                Mutation::Access { key, value } => match value {
                    Some(value) => {
                        access.insert(key.as_slice(), value.as_slice())?;
                    }
                    None => {
                        access.remove(key.as_slice())?;
                    }
                },
                Mutation::Hold { id, value } => match value {
                    Some(value) => {
                        held.insert(*id, value.as_slice())?;
                    }
                    None => {
                        held.remove(*id)?;
                    }
                },
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Opens the database (locked against a second apexd) and reads it into a state. With
/// `create`, the file just opened for it, which becomes a new store when empty; without, the
/// existing database at `path`. A redb panic on a damaged file becomes an error.
fn open_database(
    path: &Path,
    create: Option<File>,
    grants: AccessTable,
    limits: AccessLimits,
) -> Result<(Database, StoreState)> {
    catch_unwind(AssertUnwindSafe(|| {
        // A new, empty file is "repaired" into a database too: that is no news.
        let fresh = match &create {
            Some(file) => file.metadata().map(|m| m.len() == 0).unwrap_or(false),
            None => false,
        };
        let repair_path = path.display().to_string();
        let mut builder = Database::builder();
        builder
            .set_cache_size(CACHE_BYTES)
            // v3 is the format redb 3 reads without an upgrade step.
            .create_with_file_format_v3(true)
            .set_repair_callback(move |session| {
                if !fresh && session.progress() == 0.0 {
                    tracing::warn!(
                        path = %repair_path,
                        "the store was not closed cleanly; checking and repairing it"
                    );
                }
            });
        let db = match create {
            Some(file) => builder.create_file(file),
            None => builder.open(path),
        }
        .map_err(|e| database_error(path, e))?;
        let state = load(path, &db, grants, limits)?;
        Ok((db, state))
    }))
    .unwrap_or_else(|_| {
        Err(damaged(
            path,
            "the database library panicked reading it".to_owned(),
        ))
    })
}

/// Checks the format version (writing it into a new store) and reads every record.
fn load(
    path: &Path,
    db: &Database,
    grants: AccessTable,
    limits: AccessLimits,
) -> Result<StoreState> {
    let bad = |e: &dyn std::fmt::Display| damaged(path, e.to_string());
    let version = {
        let txn = db.begin_read().map_err(|e| bad(&e))?;
        let version = match txn.open_table(META) {
            Ok(meta) => meta
                .get(FORMAT_KEY)
                .map_err(|e| bad(&e))?
                .map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(bad(&e)),
        };
        if version.is_none() {
            // Records without a version were not written by apexd (it writes the version
            // first); reading them with today's encoding would be a guess.
            for table in txn.list_tables().map_err(|e| bad(&e))? {
                let name = table.name().to_owned();
                if name == ACCESS.name() || name == HELD.name() {
                    return Err(bad(&format!("it has {name} records but no format version")));
                }
            }
        }
        version
    };
    match version {
        None => {
            let txn = db.begin_write().map_err(|e| write_error(path, e))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| bad(&e))?;
                meta.insert(FORMAT_KEY, u64::from(FORMAT_VERSION))
                    .map_err(|e| write_error(path, e))?;
                txn.open_table(ACCESS).map_err(|e| bad(&e))?;
                txn.open_table(HELD).map_err(|e| bad(&e))?;
            }
            txn.commit().map_err(|e| write_error(path, e))?;
            tracing::info!(path = %path.display(), "created an empty store");
        }
        Some(v) if v > u64::from(FORMAT_VERSION) => bail!(
            "{} was written by a newer apexd (store format {v}; this apexd reads up to \
             {FORMAT_VERSION})",
            path.display()
        ),
        Some(0) => return Err(bad(&"it says store format 0, which no apexd writes")),
        Some(_) => {}
    }
    let mut state = StoreState::new(grants, limits);
    let txn = db.begin_read().map_err(|e| bad(&e))?;
    let access = txn.open_table(ACCESS).map_err(|e| bad(&e))?;
    for record in access.iter().map_err(|e| bad(&e))? {
        let (key, value) = record.map_err(|e| bad(&e))?;
        state
            .load_access(key.value(), value.value())
            .map_err(|e| bad(&e))?;
    }
    let held = txn.open_table(HELD).map_err(|e| bad(&e))?;
    for record in held.iter().map_err(|e| bad(&e))? {
        let (id, value) = record.map_err(|e| bad(&e))?;
        state
            .load_hold(id.value(), value.value())
            .map_err(|e| bad(&e))?;
    }
    Ok(state)
}

fn damaged(path: &Path, why: String) -> anyhow::Error {
    anyhow!(
        "{path} is damaged: {why}. To start with an empty store, move it aside (mv {path} \
         {path}.damaged); the access entries and held messages in it will then not be served",
        path = path.display()
    )
}

fn write_error(path: &Path, e: impl Into<redb::Error>) -> anyhow::Error {
    anyhow!("cannot write {}: {}", path.display(), e.into())
}

fn open_error(path: &Path, e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => anyhow!(
            "cannot open {}: {e} (apexd's user must be able to read and write the data \
             directory and the file in it)",
            path.display()
        ),
        _ => anyhow!("cannot open {}: {e}", path.display()),
    }
}

fn database_error(path: &Path, e: DatabaseError) -> anyhow::Error {
    match e {
        DatabaseError::DatabaseAlreadyOpen => anyhow!(
            "{} is in use by another apexd (or another process holds its lock): stop it, or \
             give this apexd its own --data-dir",
            path.display()
        ),
        // redb reports a file without its header (not a redb file) as invalid data.
        DatabaseError::Storage(StorageError::Io(io)) if io.kind() == io::ErrorKind::InvalidData => {
            damaged(
                path,
                "it is not a redb database (no redb header)".to_owned(),
            )
        }
        DatabaseError::Storage(StorageError::Io(io)) => {
            anyhow!("cannot read {}: {io}", path.display())
        }
        DatabaseError::UpgradeRequired(format) => anyhow!(
            "{} is in redb file format {format}, which this apexd's redb cannot read",
            path.display()
        ),
        other => damaged(path, other.to_string()),
    }
}

/// Wall-clock milliseconds since the epoch (0 for a clock before it).
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apex_proto::apex::access::{parse_actions, ActorPattern};
    use apex_proto::apex::addr::Endpoint;
    use apex_proto::store::{AccessChange, AccessWritten, SetRefused, StoreOp};
    use bytes::Bytes;
    use std::time::Duration;

    /// A fresh directory under the system's temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "apexd-store-{name}-{}-{}",
                std::process::id(),
                now_millis()
            ));
            let _ = std::fs::remove_dir_all(&path);
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn endpoint(text: &str) -> Endpoint {
        Endpoint::parse(text).unwrap()
    }

    fn actor(text: &str) -> ActorPattern {
        ActorPattern::parse(text).unwrap()
    }

    fn set(owner: &str, who: &str, actions: Option<&str>, expect: Option<&str>) -> StoreOp {
        StoreOp::SetAccess(AccessChange {
            owner: endpoint(owner),
            actor: actor(who),
            actions: actions.map(|a| parse_actions(a).unwrap()),
            expect: expect.map(|t| Timestamp::parse(t).unwrap()),
        })
    }

    fn hold(recipient: &str, payload: impl Into<Bytes>, remaining_ms: Option<u64>) -> StoreOp {
        StoreOp::Hold(HeldMessage {
            recipient: endpoint(recipient),
            payload: payload.into(),
            report: None,
            remaining_ms,
        })
    }

    fn request(token: u64, ops: Vec<StoreOp>) -> StoreRequest {
        StoreRequest { token, ops }
    }

    fn open(dir: &Path) -> (Store, flume::Receiver<StoreDone>) {
        let (store, mut receivers) =
            Store::open(dir, AccessTable::new(), AccessLimits::default(), 1).unwrap();
        (store, receivers.remove(0))
    }

    fn open_err(dir: &Path) -> String {
        match Store::open(dir, AccessTable::new(), AccessLimits::default(), 1) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    fn answer(done: &flume::Receiver<StoreDone>, token: u64) -> Vec<Outcome> {
        let done = done.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(done.token, token);
        done.result.unwrap()
    }

    fn written(outcome: &Outcome) -> &apex_proto::apex::access::AccessEntry {
        match outcome {
            Outcome::Access(Ok(AccessWritten::Written(entry))) => entry,
            other => panic!("not written: {other:?}"),
        }
    }

    fn held_id(outcome: &Outcome) -> HoldId {
        match outcome {
            Outcome::Held(id) => *id,
            other => panic!("not held: {other:?}"),
        }
    }

    fn has_entry(store: &Store, owner: &str, who: &str) -> bool {
        store
            .access()
            .get()
            .1
            .entry(&endpoint(owner), &actor(who))
            .is_some()
    }

    /// Runs this test binary's test `name` alone in a child process with `vars` set; returns
    /// its standard output once it succeeded.
    fn run_child(name: &str, vars: &[(&str, &Path)]) -> String {
        let exe = std::env::current_exe().unwrap();
        let mut command = std::process::Command::new(exe);
        command.args([name, "--exact", "--nocapture", "--test-threads=1"]);
        for (key, value) in vars {
            command.env(key, value);
        }
        let output = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "child {name} failed: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    #[test]
    fn records_survive_close_and_reopen() {
        let dir = TempDir::new("reopen");
        let (store, done) = open(&dir.0);
        store.submit(
            0,
            request(
                1,
                vec![
                    set(
                        "fred@example.com",
                        "barney@example.com",
                        Some("core:data"),
                        None,
                    ),
                    hold("wilma@example.com", &b"<data />"[..], Some(60_000)),
                ],
            ),
        );
        let outcomes = answer(&done, 1);
        let entry = written(&outcomes[0]).clone();
        let id = held_id(&outcomes[1]);
        store.close();
        let mode = |path: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&dir.0), 0o700);
        assert_eq!(mode(&dir.0.join(FILE_NAME)), 0o600);

        let (store, done) = open(&dir.0);
        let table = store.access().get().1;
        let stored = table
            .entry(&endpoint("fred@example.com"), &actor("barney@example.com"))
            .unwrap();
        assert_eq!(stored, &entry);
        let held = store.held_at_open();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].0, id);
        assert_eq!(held[0].1.payload, Bytes::from_static(b"<data />"));
        assert_eq!(held[0].1.recipient, endpoint("wilma@example.com"));
        let remaining = held[0].1.remaining_ms.unwrap();
        assert!((50_000..=60_000).contains(&remaining), "{remaining}");
        store.forget_held_at_open();
        assert!(store.held_at_open().is_empty());
        store.submit(0, request(2, vec![StoreOp::Release(id)]));
        assert_eq!(answer(&done, 2), vec![Outcome::Released]);
        drop(store);

        let (store, _done) = open(&dir.0);
        assert!(store.held_at_open().is_empty());
        assert!(has_entry(&store, "fred@example.com", "barney@example.com"));
    }

    #[test]
    fn completion_comes_after_commit_with_outcomes_in_order() {
        const CHILD: &str = "APEXD_STORE_TEST_COMPLETION_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            // The child: asks, waits for the answer, and dies at once without closing, so
            // only what was committed before the answer survives.
            let (store, done) = open(Path::new(&dir));
            store.submit(
                0,
                request(0, vec![hold("fred@example.com", "unanswered", None)]),
            );
            store.submit(
                0,
                request(
                    7,
                    vec![
                        set("fred@example.com", "*@example.com", Some("core:data"), None),
                        set("fred@example.com", "*@example.com", Some("all:all"), None),
                        hold("fred@example.com", "later", None),
                        StoreOp::Release(999),
                    ],
                ),
            );
            // Token 0 is not answered: the first answer is token 7's.
            let outcomes = answer(&done, 7);
            assert!(store.commits() >= 1, "answered before any commit");
            written(&outcomes[0]);
            assert_eq!(outcomes[1], Outcome::Access(Err(SetRefused::Stale)));
            assert_eq!(held_id(&outcomes[2]), 2);
            assert_eq!(outcomes[3], Outcome::Released);
            assert_eq!(outcomes.len(), 4);
            println!("child: answered");
            std::process::exit(0);
        }
        let dir = TempDir::new("completion");
        let out = run_child(
            "store::tests::completion_comes_after_commit_with_outcomes_in_order",
            &[(CHILD, &dir.0)],
        );
        assert!(out.contains("child: answered"), "{out}");
        let (store, _done) = open(&dir.0);
        assert!(has_entry(&store, "fred@example.com", "*@example.com"));
        let held = store.held_at_open();
        let payloads: Vec<_> = held.iter().map(|(_, m)| m.payload.clone()).collect();
        assert_eq!(
            payloads,
            vec![Bytes::from("unanswered"), Bytes::from("later")]
        );
    }

    #[test]
    fn a_burst_commits_in_few_transactions() {
        let dir = TempDir::new("group");
        let (store, done) = open(&dir.0);
        let before = store.commits();
        const N: u64 = 1500;
        for token in 1..=N {
            store.submit(
                0,
                request(token, vec![hold("fred@example.com", "x", Some(1000))]),
            );
        }
        for token in 1..=N {
            let outcomes = answer(&done, token);
            assert!(matches!(outcomes[..], [Outcome::Held(_)]));
        }
        let commits = store.commits() - before;
        // At most MAX_BATCH requests per transaction; far fewer transactions than requests.
        assert!(
            commits >= N.div_ceil(MAX_BATCH as u64) && commits <= N / 2,
            "{commits} commits for {N} requests"
        );
        // Each commit's write is timed, and the file has grown.
        let stats = store.stats();
        assert_eq!(stats.writes.latency.count(), stats.commits);
        assert_eq!(stats.writes.failures, 0);
        assert!(stats.file_octets > N * 50, "{} octets", stats.file_octets);
        drop(store);
        let (store, _done) = open(&dir.0);
        assert_eq!(store.held_at_open().len(), N as usize);
    }

    #[test]
    fn access_is_published_after_a_set_and_grants() {
        let dir = TempDir::new("publish");
        let (store, done) = open(&dir.0);
        let shared = store.access();
        let first = shared.generation();
        // A batch without access changes publishes nothing.
        store.submit(0, request(1, vec![hold("fred@example.com", "x", None)]));
        answer(&done, 1);
        assert_eq!(shared.generation(), first);
        assert!(!has_entry(&store, "fred@example.com", "barney@example.com"));
        store.submit(
            0,
            request(
                2,
                vec![set(
                    "fred@example.com",
                    "barney@example.com",
                    Some("core:data"),
                    None,
                )],
            ),
        );
        answer(&done, 2);
        // Published before the answer was sent.
        let (generation, table) = shared.get();
        assert!(generation > first);
        assert!(table.allows(
            &endpoint("fred@example.com"),
            &endpoint("barney@example.com"),
            "core:data"
        ));
        assert!(!table.allows(
            &endpoint("fred@example.com"),
            &endpoint("wilma@example.com"),
            "core:data"
        ));
        // A reload's grants join the stored entries.
        let mut grants = AccessTable::new();
        grants.grant_all_local(actor("*@example.com"), parse_actions("core:data").unwrap());
        store.set_grants(grants);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while shared.generation() == generation {
            assert!(std::time::Instant::now() < deadline, "grants not published");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, table) = shared.get();
        assert!(table.allows(
            &endpoint("fred@example.com"),
            &endpoint("wilma@example.com"),
            "core:data"
        ));
        assert!(has_entry(&store, "fred@example.com", "barney@example.com"));
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = TempDir::new("newer");
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join(FILE_NAME);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(FORMAT_KEY, u64::from(FORMAT_VERSION) + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        assert_eq!(
            open_err(&dir.0),
            format!(
                "{} was written by a newer apexd (store format {}; this apexd reads up to {})",
                path.display(),
                FORMAT_VERSION + 1,
                FORMAT_VERSION
            )
        );
    }

    #[test]
    fn a_file_of_garbage_is_refused() {
        let dir = TempDir::new("garbage");
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join(FILE_NAME);
        std::fs::write(&path, b"not a database at all\n".repeat(500)).unwrap();
        let err = open_err(&dir.0);
        assert!(
            err.starts_with(&format!("{} is damaged: ", path.display())),
            "{err}"
        );
        assert!(
            err.contains("not a redb database") && err.contains("move it aside"),
            "{err}"
        );
        // It is left as it was.
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"not a database at all\n".repeat(500)
        );
    }

    #[test]
    fn an_undecodable_held_record_is_refused() {
        let dir = TempDir::new("record");
        open(&dir.0).0.close();
        let path = dir.0.join(FILE_NAME);
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(HELD)
                .unwrap()
                .insert(7, &b"\x02nonsense"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let err = open_err(&dir.0);
        assert!(
            err.starts_with(&format!("{} is damaged: ", path.display())),
            "{err}"
        );
        assert!(
            err.contains("held message 7: unknown record version"),
            "{err}"
        );
        // Records without a format version are not guessed at either.
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(META).unwrap();
            txn.commit().unwrap();
        }
        let err = open_err(&dir.0);
        assert!(
            err.contains("is damaged") && err.contains("no format version"),
            "{err}"
        );
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_runs() {
        let dir = TempDir::new("twice");
        let (store, _done) = open(&dir.0);
        let err = open_err(&dir.0);
        assert!(
            err.starts_with(&format!(
                "{} is in use by another apexd",
                store.path().display()
            )),
            "{err}"
        );
        store.close();
        open(&dir.0);
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_named() {
        let dir = TempDir::new("nodir");
        std::fs::create_dir_all(&dir.0).unwrap();
        let file = dir.0.join("file");
        std::fs::write(&file, b"").unwrap();
        let err = open_err(&file.join("data"));
        assert!(
            err.starts_with(&format!(
                "cannot create the data directory {}",
                file.join("data").display()
            )),
            "{err}"
        );
    }

    #[test]
    fn requests_after_close_fail_at_once() {
        let dir = TempDir::new("closed");
        let (store, done) = open(&dir.0);
        store.close();
        store.submit(0, request(3, vec![hold("fred@example.com", "x", None)]));
        let done = done.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(done.token, 3);
        assert!(done.result.unwrap_err().0.contains("closed"));
    }

    #[test]
    fn a_failing_commit_answers_err_and_keeps_the_committed_state() {
        const CHILD: &str = "APEXD_STORE_TEST_FULL_DISK_DIR";
        let Some(dir) = std::env::var_os(CHILD) else {
            let dir = TempDir::new("full");
            let out = run_child(
                "store::tests::a_failing_commit_answers_err_and_keeps_the_committed_state",
                &[(CHILD, &dir.0)],
            );
            assert!(out.contains("child: checked"), "{out}");
            return;
        };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
        // The child: a file size limit (RLIMIT_FSIZE) stands in for a full disk. With SIGXFSZ
        // caught instead of killing the process, a write past the limit fails with EFBIG.
        let (store, done) = open(Path::new(&dir));
        store.submit(
            0,
            request(
                1,
                vec![
                    set(
                        "fred@example.com",
                        "barney@example.com",
                        Some("core:data"),
                        None,
                    ),
                    hold("fred@example.com", "small", None),
                ],
            ),
        );
        answer(&done, 1);
        let generation = store.access().generation();
        let size = std::fs::metadata(store.path()).unwrap().len();
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::FSIZE).unwrap();
        signal_hook::flag::register(
            signal_hook::consts::SIGXFSZ,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
        .unwrap();
        rlimit::setrlimit(rlimit::Resource::FSIZE, size, hard).unwrap();

        store.submit(
            0,
            request(
                2,
                vec![
                    set(
                        "fred@example.com",
                        "wilma@example.com",
                        Some("core:data"),
                        None,
                    ),
                    hold("fred@example.com", vec![b'x'; 8 << 20], None),
                ],
            ),
        );
        let failed = done.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(failed.token, 2);
        let failure = failed.result.unwrap_err().0;
        println!("child: the commit failed: {failure}");
        assert!(
            failure.contains(&store.path().display().to_string())
                && failure.contains("File too large"),
            "{failure}"
        );
        // Nothing of the batch was published.
        assert_eq!(store.access().generation(), generation);
        assert!(!has_entry(&store, "fred@example.com", "wilma@example.com"));

        // Room again: the state is what was committed (wilma's entry does not exist, barney's
        // does).
        rlimit::setrlimit(rlimit::Resource::FSIZE, hard, hard).unwrap();
        store.submit(
            0,
            request(
                3,
                vec![
                    set(
                        "fred@example.com",
                        "wilma@example.com",
                        Some("core:data"),
                        None,
                    ),
                    set(
                        "fred@example.com",
                        "barney@example.com",
                        Some("all:all"),
                        None,
                    ),
                ],
            ),
        );
        let outcomes = answer(&done, 3);
        written(&outcomes[0]);
        assert_eq!(outcomes[1], Outcome::Access(Err(SetRefused::Stale)));
        assert!(has_entry(&store, "fred@example.com", "wilma@example.com"));
        store.close();

        let (store, _done) = open(Path::new(&dir));
        assert!(has_entry(&store, "fred@example.com", "barney@example.com"));
        assert!(has_entry(&store, "fred@example.com", "wilma@example.com"));
        let held = store.held_at_open();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1.payload, Bytes::from("small"));
        println!("child: checked");
    }
}
