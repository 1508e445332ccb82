//! Configuration reload (SIGHUP): re-reading the configuration file with the command line's
//! flags merged over it exactly as at start, deciding which changes can take effect in a
//! running relay, and publishing them to the shards.
//!
//! It owns the list of reloadable settings ([`RELOADABLE`]), the comparison of two
//! configurations ([`diff`]), the value every shard follows ([`SharedSettings`]: replaced as a
//! whole, with a generation a shard compares once a second, like the access table's
//! `SharedAccess` and the users' and TLS files' `SharedSecurity`), and the reload itself
//! ([`Reloader`]). It never touches a shard's state: each shard puts a new [`Settings`] in
//! force itself (`ShardContext::apply_settings`), for what it does next; sessions, attachments,
//! binds and links stay up.
//!
//! A field not named in [`RELOADABLE`] (listen addresses, shards, the store's directory, the
//! runtime's sizes, fields added later) needs a restart: a reload names it in one warning and
//! keeps the value in force.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use apex_proto::apex::access::AccessTable;
use apex_proto::apex::msg::ApexLimits;
use apex_proto::apex::options::HoldLimits;
use apex_proto::apex::relay::AuthPolicy;
use apex_proto::shard::{Budgets, LinkConfig};
use apex_proto::SessionConfig;
use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;

use crate::apex_profile::APEX_PROFILE;
use crate::config::{Config, Overrides};
use crate::security::SharedSecurity;
use crate::store::Store;

/// The fields (dotted paths; a table stands for all its fields) a reload puts in force. Every
/// other field keeps its value until a restart.
pub const RELOADABLE: &[&str] = &[
    "log",
    "access.grants",
    "mesh.peers",
    "mesh.trusted",
    "mesh.link_queue",
    "mesh.link_in_flight",
    "mesh.max_backoff_ms",
    "mesh.connect_attempts",
    "mesh.close_timeout_ms",
    "mesh.setup_timeout_ms",
    "auth",
    "tls",
    "hold",
    "backpressure",
    "apex",
    "limits",
    "runtime.store_queue",
];

/// Whether a reload can put the field at `path` in force.
pub fn reloadable(path: &str) -> bool {
    RELOADABLE.iter().any(|field| {
        path == *field
            || path
                .strip_prefix(field)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// What differs between two configurations, by dotted field path, in the order of the
/// configuration's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Fields a reload puts in force.
    pub applied: Vec<String>,
    /// Fields that keep their value until a restart.
    pub restart: Vec<String>,
}

impl Changes {
    /// Nothing differs.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.restart.is_empty()
    }
}

/// The fields of `new` that differ from `old`, sorted into those a reload applies and those
/// that need a restart. Compared field by field as TOML, so a field added to [`Config`] is
/// compared too (and needs a restart until it is listed in [`RELOADABLE`]).
pub fn diff(old: &Config, new: &Config) -> Changes {
    let (old, new) = (flatten(old), flatten(new));
    let mut paths: Vec<&String> = old.keys().chain(new.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut changes = Changes::default();
    for path in paths {
        if old.get(path) != new.get(path) {
            if reloadable(path) {
                changes.applied.push(path.clone());
            } else {
                changes.restart.push(path.clone());
            }
        }
    }
    changes
}

/// Every leaf of `config` (arrays count as one value) by dotted path.
fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, value: toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = if prefix.is_empty() {
                        key
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf);
            }
        }
    }
    let mut out = BTreeMap::new();
    // A configuration always encodes (it is plain data); one that did not would compare empty.
    if let Ok(value) = toml::Value::try_from(config) {
        walk("", value, &mut out);
    }
    out
}

/// `new` with every field of `restart` set back to its value in `old`.
fn keep_in_force(old: &Config, new: &Config, restart: &[String]) -> Result<Config> {
    let old = toml::Value::try_from(old).context("encoding the configuration in force")?;
    let mut merged = toml::Value::try_from(new).context("encoding the reloaded configuration")?;
    for path in restart {
        let keys: Vec<&str> = path.split('.').collect();
        let Some((last, parents)) = keys.split_last() else {
            continue;
        };
        let kept = parents
            .iter()
            .try_fold(&old, |value, key| value.get(key))
            .and_then(|table| table.get(last))
            .cloned();
        let Some(table) = parents
            .iter()
            .try_fold(&mut merged, |value, key| value.get_mut(key))
            .and_then(toml::Value::as_table_mut)
        else {
            continue;
        };
        match kept {
            Some(value) => {
                table.insert((*last).to_owned(), value);
            }
            None => {
                table.remove(*last);
            }
        }
    }
    merged
        .try_into()
        .map_err(|e| anyhow!("decoding the reloaded configuration: {e}"))
}

/// What each shard takes from the configuration and can change while it runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Static routes to other relays (`mesh.peers`), for the next connection of a link.
    pub routes: Vec<(String, SocketAddr)>,
    /// Who may attach and bind as what (`auth.mode`, and the addresses of `mesh.peers`).
    pub auth: AuthPolicy,
    /// Trusted intermediary domains (`mesh.trusted`).
    pub trusted: Vec<String>,
    /// Bounds of the hold4Endpoint queue (`[hold]`).
    pub hold: HoldLimits,
    /// Bounds on control documents (`[apex]`).
    pub apex: ApexLimits,
    /// Store requests kept waiting (`runtime.store_queue`).
    pub store_queue: usize,
    /// How outbound relay links behave (`[mesh]`).
    pub link: LinkConfig,
    /// Shard-wide backpressure (`[backpressure]`).
    pub budgets: Budgets,
    /// Sessions accepted from now on (`[limits]`).
    pub session: SessionConfig,
}

impl Settings {
    /// The settings of a validated `config`.
    pub fn from_config(config: &Config) -> Result<Settings> {
        let routes = config.static_routes()?;
        Ok(Settings {
            auth: AuthPolicy {
                mode: config.auth_mode()?,
                relay_addresses: relay_addresses(&routes),
            },
            routes,
            trusted: config.mesh.trusted.clone(),
            hold: (&config.hold).into(),
            apex: (&config.apex).into(),
            store_queue: config.runtime.store_queue,
            link: config.link_config(),
            budgets: config.budgets(),
            session: SessionConfig {
                profiles: vec![APEX_PROFILE.to_owned()],
                limits: (&config.limits).into(),
                ..SessionConfig::default()
            },
        })
    }
}

/// The addresses each statically routed domain's relay is reached at: a connection from one of
/// them may bind as that domain without TLS.
pub fn relay_addresses(
    routes: &[(String, SocketAddr)],
) -> FxHashMap<String, Vec<std::net::IpAddr>> {
    let mut addresses: FxHashMap<String, Vec<std::net::IpAddr>> = FxHashMap::default();
    for (domain, addr) in routes {
        addresses.entry(domain.clone()).or_default().push(addr.ip());
    }
    addresses
}

/// The [`Settings`] every shard follows, replaced as a whole by a reload.
#[derive(Debug)]
pub struct SharedSettings {
    current: ArcSwap<Settings>,
    generation: AtomicU64,
}

impl SharedSettings {
    /// Starts with `settings` at generation 1.
    pub fn new(settings: Settings) -> Self {
        Self {
            current: ArcSwap::from_pointee(settings),
            generation: AtomicU64::new(1),
        }
    }

    /// The generation in force; it grows with every publish.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The generation and the settings: read in that order, so the settings are at least as
    /// new as the generation says (see `SharedAccess::get`).
    pub fn get(&self) -> (u64, Arc<Settings>) {
        let generation = self.generation();
        (generation, self.current.load_full())
    }

    /// Puts `settings` in force, then bumps the generation.
    pub fn publish(&self, settings: Settings) {
        self.current.store(Arc::new(settings));
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// Changes the log filter of the running process; an invalid filter is an error and changes
/// nothing.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<()> + Send + Sync>;

/// Re-reads the configuration and puts what changed in force. One per process; a reload is
/// all or nothing.
pub struct Reloader {
    path: Option<PathBuf>,
    overrides: Overrides,
    security: Arc<SharedSecurity>,
    settings: Arc<SharedSettings>,
    set_log: SetLogFilter,
    state: Mutex<State>,
}

struct State {
    /// The configuration in force, as loaded (listen addresses as configured, not as bound).
    config: Config,
    /// Where reloaded grants go, once it is open.
    store: Option<Store>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for the relay started with `config`, loaded from `path` (`None`: the
    /// embedded default) and `overrides` (the command line).
    pub fn new(
        path: Option<&Path>,
        overrides: Overrides,
        config: Config,
        security: Arc<SharedSecurity>,
        settings: Arc<SharedSettings>,
        set_log: SetLogFilter,
    ) -> Self {
        Self {
            path: path.map(Path::to_path_buf),
            overrides,
            security,
            settings,
            set_log,
            state: Mutex::new(State {
                config,
                store: None,
            }),
        }
    }

    /// Opens the store with `open`, given the configuration grants in force; the grants of
    /// later reloads go to it. A reload waits while the store opens, so none is lost.
    pub fn open_store<T>(
        &self,
        open: impl FnOnce(AccessTable) -> Result<(Store, T)>,
    ) -> Result<(Store, T)> {
        let mut state = self.lock();
        let grants = state.config.access_table()?;
        let (store, rest) = open(grants)?;
        state.store = Some(store.clone());
        Ok((store, rest))
    }

    /// The file a reload reads, as errors name it.
    fn origin(&self) -> String {
        self.path.as_ref().map_or_else(
            || "the embedded default configuration".to_owned(),
            |p| p.display().to_string(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Re-reads the configuration, the users file and the TLS files, and puts them in force.
    /// On an error nothing changes, and the error names the file (and the line and field when
    /// the configuration is at fault). Returns what changed in the configuration.
    pub fn reload(&self) -> Result<Changes> {
        let mut state = self.lock();
        let old = &state.config;
        let loaded = Config::load(self.path.as_deref(), &self.overrides)?;
        let changes = diff(old, &loaded);
        // `$DOMAIN` in the grants stands for the domain in force, which only a restart changes.
        let loaded = if loaded.domain == old.domain {
            loaded
        } else {
            let pinned = Overrides {
                domain: Some(old.domain.clone()),
                ..self.overrides.clone()
            };
            Config::load(self.path.as_deref(), &pinned)?
        };
        let next = keep_in_force(old, &loaded, &changes.restart)?;
        next.validate()
            .map_err(|e| anyhow!("{}: {e:#}", self.origin()))?;
        let settings = Settings::from_config(&next)?;
        let security = crate::security::load(&next)?;
        let grants = (next.access.grants != old.access.grants)
            .then(|| next.access_table())
            .transpose()?;
        if next.log != old.log {
            (self.set_log)(&next.log).map_err(|e| {
                let line = self
                    .path
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .and_then(|text| crate::config::field_line(&text, "log"))
                    .map(|line| format!(":{line}"))
                    .unwrap_or_default();
                anyhow!("{}{line}: field `log`: {e:#}", self.origin())
            })?;
        }
        // Security before settings: a shard that sees the new settings sees the new security
        // too, so its links' TLS and its certificates never disagree.
        self.security.replace(security);
        self.settings.publish(settings);
        if let (Some(grants), Some(store)) = (grants, &state.store) {
            store.set_grants(grants);
        }
        state.config = next;
        Ok(changes)
    }

    /// [`Reloader::reload`], with its outcome logged: one error, or one warning naming what
    /// needs a restart and one line saying what changed.
    pub fn reload_and_log(&self) {
        match self.reload() {
            Err(e) => tracing::error!(
                target: "apexd::reload",
                "reload failed, the configuration in force stays: {e:#}"
            ),
            Ok(changes) => {
                if !changes.restart.is_empty() {
                    tracing::warn!(
                        target: "apexd::reload",
                        "reload: {} changed in {} but only a restart changes it; the value in force stays",
                        changes.restart.join(", "),
                        self.origin()
                    );
                }
                let users = self.security.get().1.users.len();
                let applied = if changes.applied.is_empty() {
                    "nothing".to_owned()
                } else {
                    changes.applied.join(", ")
                };
                tracing::info!(
                    target: "apexd::reload",
                    users,
                    "configuration reloaded from {}: changed {applied}; users and TLS files re-read",
                    self.origin()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let mut config = Config::from_toml(text, "t.toml").unwrap();
        config.domain = "example.com".into();
        config.validate().unwrap();
        config
    }

    #[test]
    fn reloadable_fields_are_matched_by_whole_segments() {
        for path in [
            "log",
            "access.grants",
            "mesh.peers",
            "mesh.trusted",
            "hold.max_messages",
            "auth.mode",
            "tls.ca",
            "limits.recv_window",
            "runtime.store_queue",
        ] {
            assert!(reloadable(path), "{path}");
        }
        for path in [
            "domain",
            "edge_listen",
            "mesh_listen",
            "shards",
            "pin",
            "data_dir",
            "shutdown_grace_ms",
            "runtime.io_memory",
            "runtime.ring_depth",
            "runtime.max_connections",
            "mesh.dns_server",
            "access.max_entries",
            // Fields not known here are not reloadable, nor ones sharing a prefix.
            "metrics_listen",
            "log_format",
            "holdings",
            "mesh.peers_extra",
        ] {
            assert!(!reloadable(path), "{path}");
        }
    }

    #[test]
    fn diff_sorts_changes_into_applied_and_restart() {
        let old = config("");
        assert!(diff(&old, &old).is_empty());
        let new = config(
            "edge_listen = \"127.0.0.1:9913\"\nshards = 3\nlog = \"debug\"\n\
             [mesh]\npeers = [\"rubble.com=127.0.0.1:9912\"]\ntrusted = [\"*\"]\nlink_queue = 8\n\
             dns_server = \"127.0.0.1:53\"\n\
             [access]\ngrants = []\nmax_entries = 5\n\
             [hold]\nmax_messages = 7\n\
             [runtime]\nio_memory = 1048576\nstore_queue = 9\n",
        );
        let changes = diff(&old, &new);
        assert_eq!(
            changes.applied,
            [
                "access.grants",
                "hold.max_messages",
                "log",
                "mesh.link_queue",
                "mesh.peers",
                "mesh.trusted",
                "runtime.store_queue"
            ]
        );
        assert_eq!(
            changes.restart,
            [
                "access.max_entries",
                "edge_listen",
                "mesh.dns_server",
                "runtime.io_memory",
                "shards"
            ]
        );
    }

    #[test]
    fn fields_needing_a_restart_keep_their_value_in_force() {
        let old = config("");
        let new = config(
            "edge_listen = \"127.0.0.1:9913\"\ndata_dir = \"/srv/x\"\n\
             [mesh]\npeers = [\"rubble.com=127.0.0.1:9912\"]\n[runtime]\nring_depth = 256\n",
        );
        let changes = diff(&old, &new);
        let kept = keep_in_force(&old, &new, &changes.restart).unwrap();
        assert_eq!(kept.edge_listen, old.edge_listen);
        assert_eq!(kept.data_dir, old.data_dir);
        assert_eq!(kept.runtime.ring_depth, old.runtime.ring_depth);
        assert_eq!(kept.mesh.peers, new.mesh.peers);
        // Only the reloadable change is left.
        assert_eq!(diff(&old, &kept).applied, ["mesh.peers"]);
        assert!(diff(&old, &kept).restart.is_empty());
    }

    #[test]
    fn settings_follow_the_configuration() {
        let config = config(
            "[mesh]\npeers = [\"rubble.com=127.0.0.1:9912\"]\ntrusted = [\"slate.com\"]\n\
             [auth]\nmode = \"off\"\n[hold]\nmax_hold_ms = 5\n[limits]\nrecv_window = 8192\n",
        );
        let settings = Settings::from_config(&config).unwrap();
        let addr: SocketAddr = "127.0.0.1:9912".parse().unwrap();
        assert_eq!(settings.routes, [("rubble.com".to_owned(), addr)]);
        assert_eq!(
            settings.auth.relay_addresses.get("rubble.com"),
            Some(&vec![addr.ip()])
        );
        assert_eq!(settings.auth.mode, apex_proto::apex::relay::AuthMode::Off);
        assert_eq!(settings.trusted, ["slate.com"]);
        assert_eq!(settings.hold.max_hold_ms, Some(5));
        assert_eq!(settings.session.limits.recv_window, 8192);
    }

    #[test]
    fn shared_settings_publish_bumps_the_generation() {
        let shared = SharedSettings::new(Settings::from_config(&config("")).unwrap());
        let (first, settings) = shared.get();
        assert!(settings.routes.is_empty());
        let next = config("[mesh]\npeers = [\"rubble.com=127.0.0.1:9912\"]\n");
        shared.publish(Settings::from_config(&next).unwrap());
        let (second, settings) = shared.get();
        assert!(second > first);
        assert_eq!(settings.routes.len(), 1);
    }

    fn reloader(path: &Path, overrides: Overrides) -> (Reloader, Arc<SharedSettings>) {
        let config = Config::load(Some(path), &overrides).unwrap();
        let security = Arc::new(SharedSecurity::new(crate::security::load(&config).unwrap()));
        let settings = Arc::new(SharedSettings::new(Settings::from_config(&config).unwrap()));
        let logs = Arc::new(Mutex::new(Vec::<String>::new()));
        let set_log: SetLogFilter = Box::new(move |filter| {
            tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| anyhow!("{e}"))?;
            logs.lock().unwrap().push(filter.to_owned());
            Ok(())
        });
        let reloader = Reloader::new(
            Some(path),
            overrides,
            config,
            security,
            settings.clone(),
            set_log,
        );
        (reloader, settings)
    }

    #[test]
    fn a_reload_applies_the_file_under_the_same_flags_or_nothing() {
        let dir = std::env::temp_dir().join(format!("apexd-reload-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "domain = \"example.com\"\n[hold]\nmax_messages = 3\n",
        )
        .unwrap();
        let overrides = Overrides {
            trusted: vec!["flag.com".into()],
            shards: Some(1),
            ..Overrides::default()
        };
        let (reloader, settings) = reloader(&path, overrides);
        let (first, _) = settings.get();

        // The flags still override the file: its shards and trust are not the ones in force.
        std::fs::write(
            &path,
            "domain = \"example.com\"\nshards = 4\nedge_listen = \"127.0.0.1:9913\"\n\
             [hold]\nmax_messages = 5\n[mesh]\ntrusted = [\"file.com\"]\n",
        )
        .unwrap();
        let changes = reloader.reload().unwrap();
        assert_eq!(changes.applied, ["hold.max_messages", "mesh.trusted"]);
        assert_eq!(changes.restart, ["edge_listen"]);
        let (second, in_force) = settings.get();
        assert!(second > first);
        assert_eq!(in_force.hold.max_messages, 5);
        assert_eq!(in_force.trusted, ["file.com", "flag.com"]);

        // A broken file changes nothing, and says where it is broken.
        std::fs::write(
            &path,
            "domain = \"example.com\"\n\n[hold]\nmax_messages = \"many\"\n",
        )
        .unwrap();
        let err = format!("{:#}", reloader.reload().unwrap_err());
        assert!(
            err.contains(&format!("{}:4:", path.display())) && err.contains("hold.max_messages"),
            "{err}"
        );
        // So does a value that parses but cannot work.
        std::fs::write(
            &path,
            "domain = \"example.com\"\n[mesh]\n\npeers = [\"rubble.com\"]\n",
        )
        .unwrap();
        let err = format!("{:#}", reloader.reload().unwrap_err());
        assert!(
            err.contains(&format!("{}:4:", path.display())) && err.contains("mesh.peers"),
            "{err}"
        );
        // And a log filter that does not parse.
        std::fs::write(&path, "domain = \"example.com\"\nlog = \"apexd=[\"\n").unwrap();
        let err = format!("{:#}", reloader.reload().unwrap_err());
        assert!(
            err.contains(&format!("{}:2: field `log`", path.display())),
            "{err}"
        );
        assert_eq!(settings.get().0, second);
        assert_eq!(settings.get().1.hold.max_messages, 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
