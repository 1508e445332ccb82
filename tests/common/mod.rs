//! Shared support for loopback integration tests: start the real `apexd` binary on ephemeral
//! loopback ports, and a blocking BEEP client built on the protocol core.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use apex_proto::apex::client;
use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::{Event, Role, Session, SessionConfig};
use bytes::{Buf, BytesMut};

pub mod dns_server;

/// The APEX profile URI (RFC 3340 §4.2).
pub use apex_proto::apex::relay::APEX_PROFILE as APEX;

/// A directory of its own for one test (a relay's store), removed when dropped.
pub struct ScratchDir {
    pub path: std::path::PathBuf,
}

impl ScratchDir {
    pub fn new(what: &str) -> ScratchDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "apexd-test-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        ScratchDir { path }
    }

    pub fn as_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running relay, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Relay {
    pub child: Child,
    pub edge: SocketAddr,
    pub mesh: SocketAddr,
    /// The monitoring endpoint, when the relay was started with --metrics-listen.
    pub metrics: Option<SocketAddr>,
    /// The relay's store directory, unless the test chose one with --data-dir.
    pub state: Option<ScratchDir>,
}

impl Relay {
    pub fn start(shards: usize) -> Relay {
        Self::start_with(&["--shards", &shards.to_string()])
    }

    /// Starts apexd with `extra` arguments; without `--data-dir`, its store is in a fresh
    /// directory of its own (so that no two relays, and no two tests, share one).
    pub fn start_with(extra: &[&str]) -> Relay {
        let state = (!extra.contains(&"--data-dir")).then(|| ScratchDir::new("state"));
        let mut relay = Self::spawn(extra, state.as_ref().map(ScratchDir::as_str));
        relay.state = state;
        relay
    }

    /// [`Relay::start_with`], with the relay's standard error written to `stderr` (a file in
    /// a [`ScratchDir`]) for the test to read its log lines.
    pub fn start_logging(extra: &[&str], stderr: &std::path::Path) -> Relay {
        let state = ScratchDir::new("state");
        let file = std::fs::File::create(stderr).unwrap();
        let mut relay = Self::spawn_to(extra, Some(state.as_str()), Stdio::from(file), &[]);
        relay.state = Some(state);
        relay
    }

    /// Starts apexd with `extra` arguments and the store in `data_dir` (`None`: as given in
    /// `extra`).
    pub fn spawn(extra: &[&str], data_dir: Option<&str>) -> Relay {
        Self::spawn_to(extra, data_dir, Stdio::inherit(), &[])
    }

    /// As [`Relay::spawn`], with `env` added to apexd's environment.
    pub fn spawn_with_env(
        extra: &[&str],
        data_dir: Option<&str>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Relay {
        Self::spawn_to(extra, data_dir, Stdio::inherit(), env)
    }

    fn spawn_to(
        extra: &[&str],
        data_dir: Option<&str>,
        stderr: Stdio,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Relay {
        // APEXD_TEST_BIN runs another build (e.g. one with a sanitizer) under the same tests;
        // APEXD_TEST_LOG raises the relay's log level when a test needs investigating.
        let log = std::env::var("APEXD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let mut defaults = vec!["--no-pin"];
        if !extra.contains(&"--log") {
            defaults.extend(["--log", log.as_str()]);
        }
        for flag in ["--edge-listen", "--mesh-listen"] {
            if !extra.contains(&flag) {
                defaults.extend([flag, "127.0.0.1:0"]);
            }
        }
        if let Some(dir) = data_dir {
            defaults.extend(["--data-dir", dir]);
        }
        Self::launch(&[defaults.as_slice(), extra].concat(), stderr, env).0
    }

    /// Starts apexd with `--no-pin` and exactly `args` (no listen addresses or data directory
    /// added), and hands its log lines (stderr) over as they come.
    pub fn spawn_logged(args: &[&str]) -> (Relay, mpsc::Receiver<String>) {
        let (relay, stderr) = Self::launch(&[&["--no-pin"], args].concat(), Stdio::piped(), &[]);
        let (tx, rx) = mpsc::channel();
        if let Some(stderr) = stderr {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    let _ = tx.send(line);
                }
            });
        }
        (relay, rx)
    }

    /// [`Relay::start_with`] under `ulimit -n nofile` (set by a shell that then runs apexd
    /// in its place, so the pid is apexd's).
    pub fn start_with_nofile(nofile: u64, extra: &[&str]) -> Relay {
        let state = ScratchDir::new("state");
        let mut args = vec!["--no-pin", "--log", "warn", "--data-dir", state.as_str()];
        for flag in ["--edge-listen", "--mesh-listen"] {
            args.extend([flag, "127.0.0.1:0"]);
        }
        args.extend(extra);
        let mut relay = Self::launch_limited(&args, Stdio::inherit(), &[], Some(nofile)).0;
        relay.state = Some(state);
        relay
    }

    fn launch(
        args: &[&str],
        stderr: Stdio,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Relay, Option<std::process::ChildStderr>) {
        Self::launch_limited(args, stderr, env, None)
    }

    fn launch_limited(
        args: &[&str],
        stderr: Stdio,
        env: &[(&str, &std::ffi::OsStr)],
        nofile: Option<u64>,
    ) -> (Relay, Option<std::process::ChildStderr>) {
        let bin: std::ffi::OsString = std::env::var_os("APEXD_TEST_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_apexd").into());
        let mut command = match nofile {
            None => Command::new(bin),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                sh
            }
        };
        let mut child = command
            .args(args)
            // A lookup that would leave loopback (no loopback --dns-server) fails, naming the domain.
            .env("APEXD_DNS_LOOPBACK_ONLY", "1")
            // Tests run under a service manager must not notify it on the relays' behalf.
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn apexd");
        let stderr = child.stderr.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("apexd did not report ready");
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line}"))
                .parse()
                .unwrap()
        };
        let relay = Relay {
            edge: field("edge="),
            mesh: field("mesh="),
            metrics: line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("metrics="))
                .map(|a| a.parse().unwrap()),
            child,
            state: None,
        };
        (relay, stderr)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "apexd did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` from an HTTP server on loopback: the status code and the body. Bounded: 5 s
/// to connect and for each read.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The sum over every series of `family` (a Prometheus text exposition), e.g.
/// `apexd_data_accepted_total`: the total over shards.
pub fn metric_sum(exposition: &str, family: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            (name == family)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A BEEP initiator over loopback, driven by the protocol core. Reads and writes wait at most
/// 50 ms: a test drives many clients from one thread, and a relay applying backpressure to one
/// of them (not reading it) must not stop the others, whose replies may be what it waits for.
pub struct Client {
    pub stream: TcpStream,
    pub session: Session,
    pub inbox: BytesMut,
    /// Output polled from the session and not yet taken by the socket.
    pub outbox: BytesMut,
    pub events: Vec<Event>,
    pub eof: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            // A test client may pipeline more than the relay's own bound.
            session: Session::new(
                Role::Initiator,
                SessionConfig {
                    limits: apex_proto::Limits {
                        max_outstanding_msgs: 1 << 20,
                        ..Default::default()
                    },
                    ..SessionConfig::default()
                },
            ),
            inbox: BytesMut::new(),
            outbox: BytesMut::new(),
            events: Vec::new(),
            eof: false,
        }
    }

    /// Writes pending output, reads what arrived, collects events.
    pub fn pump(&mut self) {
        while self.session.poll_transmit(&mut self.outbox) > 0 {}
        while !self.outbox.is_empty() {
            match self.stream.write(&self.outbox) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.outbox.advance(n),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(_) => {
                    self.eof = true;
                    break;
                }
            }
        }
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.inbox.extend_from_slice(&buf[..n]);
                self.session
                    .handle_input(&mut self.inbox, Instant::now())
                    .expect("relay sent a valid stream");
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => self.eof = true,
        }
        while let Some(event) = self.session.poll_event() {
            self.events.push(event);
        }
    }

    /// Pumps until `done` holds (panics after 10 s).
    pub fn pump_until(&mut self, what: &str, mut done: impl FnMut(&Client) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events {:?}",
                self.events
            );
            self.pump();
        }
    }

    pub fn greet(&mut self) {
        self.pump_until("greeting", |c| {
            c.events.iter().any(|e| matches!(e, Event::Greeting(_)))
        });
    }

    pub fn start_apex(&mut self) -> u32 {
        let channel = self
            .session
            .start_channel(vec![ProfileOffer::new(APEX)], None)
            .unwrap();
        self.pump_until("channel start", |c| {
            c.events
                .iter()
                .any(|e| matches!(e, Event::ChannelStarted { channel: ch, .. } if *ch == channel))
        });
        channel
    }

    /// Starts an APEX channel with a piggybacked attach (RFC 3340 §4.2); returns the channel
    /// and the piggybacked reply (`<ok />` or an `error`).
    pub fn attach(&mut self, endpoint: &str) -> (u32, String) {
        let offer = client::attach_offer(endpoint, 1);
        let channel = self.session.start_channel(vec![offer], None).unwrap();
        self.pump_until("attach", |c| {
            c.events
                .iter()
                .any(|e| matches!(e, Event::ChannelStarted { channel: ch, .. } if *ch == channel))
        });
        let content = self
            .events
            .iter()
            .find_map(|e| match e {
                Event::ChannelStarted {
                    channel: ch,
                    content,
                    ..
                } if *ch == channel => content.clone(),
                _ => None,
            })
            .unwrap_or_default();
        (channel, String::from_utf8_lossy(&content).into_owned())
    }

    /// Sends `payload` as a MSG and waits for its reply: (positive, reply payload).
    pub fn request(&mut self, channel: u32, payload: bytes::Bytes) -> (bool, bytes::Bytes) {
        let msgno = self.session.send_msg(channel, payload).unwrap();
        self.pump_until("reply", |c| c.events.iter().any(|e| matches!(e, Event::Reply { channel: ch, msgno: m, .. } if *ch == channel && *m == msgno)));
        let index = self
            .events
            .iter()
            .position(|e| matches!(e, Event::Reply { channel: ch, msgno: m, .. } if *ch == channel && *m == msgno))
            .unwrap();
        match self.events.remove(index) {
            Event::Reply { kind, payload, .. } => (kind == apex_proto::ReplyKind::Rpy, payload),
            _ => unreachable!(),
        }
    }

    /// Waits for the next MSG from the relay, answers it `ok` and returns its payload.
    pub fn receive(&mut self) -> bytes::Bytes {
        self.pump_until("a MSG from the relay", |c| {
            c.events.iter().any(|e| matches!(e, Event::Message { .. }))
        });
        let index = self
            .events
            .iter()
            .position(|e| matches!(e, Event::Message { .. }))
            .unwrap();
        let Event::Message {
            channel,
            msgno,
            payload,
        } = self.events.remove(index)
        else {
            unreachable!()
        };
        self.session
            .send_rpy(channel, msgno, client::ok_payload())
            .unwrap();
        self.pump();
        payload
    }

    /// Pumps once and answers `ok` to every MSG received, returning their payloads.
    pub fn drain_messages(&mut self) -> Vec<bytes::Bytes> {
        self.pump();
        let mut payloads = Vec::new();
        let mut rest = Vec::new();
        for event in std::mem::take(&mut self.events) {
            match event {
                Event::Message {
                    channel,
                    msgno,
                    payload,
                } => {
                    self.session
                        .send_rpy(channel, msgno, client::ok_payload())
                        .unwrap();
                    payloads.push(payload);
                }
                other => rest.push(other),
            }
        }
        self.events = rest;
        payloads
    }

    pub fn release(&mut self) {
        self.session.close_session(200).unwrap();
        self.pump_until("release", |c| c.events.contains(&Event::SessionReleased));
        self.pump_until("EOF after release", |c| c.eof);
    }
}

/// A loopback port that was free a moment ago (for relays that must know each other's ports
/// before either starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
