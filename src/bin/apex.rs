//! `apex`: a command-line APEX endpoint (RFC 3340) for talking to a relay over BEEP.
//!
//! ```text
//! apex --relay HOST:PORT attach NAME [--count N] [--timeout SECS]
//! apex --relay HOST:PORT send --from NAME --to NAME [--to NAME...] [--status] [--timeout SECS] TEXT|-
//! ```
//!
//! Both commands connect, exchange greetings and start channel 1 with the APEX profile,
//! piggybacking `<attach endpoint='NAME' transID='1' />` (RFC 3340 §4.2). `attach` then
//! prints `attached NAME` and one line per delivered `data`; `send` sends one `data` and prints
//! `accepted` or `error CODE TEXT`, then, with `--status`, one `status IDENTITY CODE TEXT` line per
//! destination of the relay's statusResponse (RFC 3340 §5.1, §6.2). Blocking std
//! networking over the sans-IO session of `apex-proto`; no async runtime.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::client::{
    self, attach_message, attach_offer, ok_payload, parse_answer, parse_incoming,
    parse_piggybacked_answer, Answer, Content, DataBuilder, Incoming,
};
use apex_proto::apex::msg::{error_payload, Data};
use apex_proto::{xml, Event, ReplyKind, Role, Session, SessionConfig};
use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};

use apex_proto::apex::relay::APEX_PROFILE as APEX;

/// The transaction identifier of our (only) attach on the channel.
const ATTACH_TRANS_ID: u32 = 1;

/// Longest a single read blocks, so that a signal is noticed promptly.
const POLL: Duration = Duration::from_millis(100);

/// How long `send --status` waits for the report by default.
const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds for XML we parse ourselves (data-content bodies).
const XML_DEPTH: usize = 32;
const XML_ATTRIBUTES: usize = 16;

/// Command-line APEX endpoint: attach to a relay and print the data it delivers, or send data.
#[derive(Debug, Parser)]
#[command(name = "apex", version)]
struct Cli {
    /// The relay's endpoint (apex-edge) address.
    #[arg(long, value_name = "HOST:PORT")]
    relay: String,
    /// Seconds allowed for connecting, each handshake step, the relay's answer to our data and
    /// closing the session.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// attach: detach and exit (status 0) after SECS without traffic from the relay (default:
    /// never). send: seconds to wait for the status report once the relay accepted the data
    /// (default: 10).
    #[arg(long, global = true, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach as NAME and print one line per data delivered: `from=.. to=.. content=..`.
    Attach {
        /// Endpoint identity to attach as, e.g. barney@example.com.
        #[arg(value_name = "NAME")]
        name: String,
        /// Detach and exit after N data messages.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Attach as --from and send one data to every --to; prints `accepted` or `error CODE TEXT`.
    Send {
        /// Originator: the endpoint to attach and send as.
        #[arg(long, value_name = "NAME")]
        from: String,
        /// Recipient endpoint (repeatable).
        #[arg(long = "to", value_name = "NAME", required = true)]
        to: Vec<String>,
        /// Ask for a statusResponse and print `status IDENTITY CODE TEXT` per destination.
        #[arg(long)]
        status: bool,
        /// The content, sent as text in a data-content element; `-` reads standard input
        /// (one trailing newline is dropped).
        #[arg(value_name = "TEXT|-")]
        text: String,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// How a command ended when it did not fail with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Exit status 0.
    Success,
    /// Exit status 1; the reason was already printed (`error CODE TEXT`).
    Failed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Status::Success) => ExitCode::SUCCESS,
        Ok(Status::Failed) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("apex: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<Status> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a clean detach; a second one exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let io_timeout = cli.connect_timeout;
    let stdout = std::io::stdout();
    match cli.command {
        Command::Attach { name, count } => {
            let opts = AttachOpts {
                name: endpoint(&name)?,
                count,
                idle: cli.timeout,
                io_timeout,
            };
            let stream = connect(&cli.relay, io_timeout)?;
            run_attach(stream, &opts, stop, &mut stdout.lock())
        }
        Command::Send {
            from,
            to,
            status,
            text,
        } => {
            let text = if text == "-" { read_stdin()? } else { text };
            check_xml_chars(&text)?;
            let opts = SendOpts {
                from: endpoint(&from)?,
                to: to.iter().map(|t| endpoint(t)).collect::<Result<_>>()?,
                status: status.then(status_trans_id),
                text,
                status_timeout: cli.timeout.unwrap_or(DEFAULT_STATUS_TIMEOUT),
                io_timeout,
            };
            let stream = connect(&cli.relay, io_timeout)?;
            run_send(stream, &opts, stop, &mut stdout.lock())
        }
    }
}

fn endpoint(text: &str) -> Result<Endpoint> {
    Endpoint::parse(text).map_err(|e| anyhow!("invalid endpoint identity '{text}': {e}"))
}

fn read_stdin() -> Result<String> {
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .context("reading standard input")?;
    let mut text = String::from_utf8(raw).map_err(|_| anyhow!("standard input is not UTF-8"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// XML 1.0 cannot carry most C0 controls, even as character references.
fn check_xml_chars(text: &str) -> Result<()> {
    match text.chars().find(|c| {
        (*c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    }) {
        Some(c) => bail!(
            "the content holds U+{:04X}, which XML cannot carry",
            u32::from(c)
        ),
        None => Ok(()),
    }
}

/// A random-looking transaction identifier in 1..=2^31-1 (RFC 3340 §6.1.1).
fn status_trans_id() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    match (x & 0x7FFF_FFFF) as u32 {
        0 => 1,
        id => id,
    }
}

fn connect(relay: &str, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = relay
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve relay address '{relay}'"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(anyhow!("cannot connect to {relay}: {e}")),
        None => Err(anyhow!("relay address '{relay}' resolves to nothing")),
    }
}

/// What `Peer::wait` came back with.
#[derive(Debug)]
enum Wait {
    Event(Event),
    Timeout,
    Interrupted,
}

/// One BEEP session over a blocking TCP stream.
struct Peer {
    stream: TcpStream,
    session: Session,
    inbox: BytesMut,
    stop: Arc<AtomicBool>,
    /// Whether `wait` reports a raised stop flag (not while detaching).
    interruptible: bool,
}

impl Peer {
    fn new(
        stream: TcpStream,
        session: Session,
        stop: Arc<AtomicBool>,
        io: Duration,
    ) -> Result<Self> {
        stream.set_nodelay(true).context("configuring the socket")?;
        stream
            .set_write_timeout(Some(io))
            .context("configuring the socket")?;
        Ok(Self {
            stream,
            session,
            inbox: BytesMut::with_capacity(16 * 1024),
            stop,
            interruptible: true,
        })
    }

    fn initiator(stream: TcpStream, stop: Arc<AtomicBool>, io: Duration) -> Result<Self> {
        Self::new(
            stream,
            Session::new(Role::Initiator, SessionConfig::default()),
            stop,
            io,
        )
    }

    /// Writes everything the session has to send.
    fn flush(&mut self) -> Result<()> {
        let mut out = BytesMut::new();
        while self.session.poll_transmit(&mut out) > 0 {}
        if !out.is_empty() {
            self.stream
                .write_all(&out)
                .context("writing to the relay")?;
        }
        Ok(())
    }

    /// Flushes, then returns the next session event, reading as needed until `deadline`.
    fn wait(&mut self, deadline: Option<Instant>) -> Result<Wait> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            self.flush()?;
            if let Some(event) = self.session.poll_event() {
                return Ok(Wait::Event(event));
            }
            if self.interruptible && self.stop.load(Ordering::Relaxed) {
                return Ok(Wait::Interrupted);
            }
            let slice = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Wait::Timeout);
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            self.stream
                .set_read_timeout(Some(slice))
                .context("configuring the socket")?;
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("connection closed by the relay"),
                Ok(n) => {
                    self.inbox.extend_from_slice(&buf[..n]);
                    self.session
                        .handle_input(&mut self.inbox, Instant::now())
                        .map_err(|e| anyhow!("BEEP protocol error from the relay: {e}"))?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("reading from the relay"),
            }
        }
    }

    fn rpy_ok(&mut self, channel: u32, msgno: u32) -> Result<()> {
        self.session
            .send_rpy(channel, msgno, ok_payload())
            .map_err(|e| anyhow!("cannot reply: {e}"))
    }

    fn err(&mut self, channel: u32, msgno: u32, code: u16, text: &str) -> Result<()> {
        self.session
            .send_err(channel, msgno, error_payload(code, text))
            .map_err(|e| anyhow!("cannot reply: {e}"))
    }

    /// Closes `channel` (when given and still open), then releases the session (RFC 3080
    /// §2.3.1.3, §2.4). MSGs arriving meanwhile are refused with 421.
    fn close(&mut self, channel: Option<u32>, deadline: Instant) -> Result<()> {
        self.interruptible = false;
        let mut channel = channel.filter(|c| self.session.channel_profile(*c).is_some());
        match channel {
            Some(c) => self.session.close_channel(c, 200),
            None => self.session.close_session(200),
        }
        .map_err(|e| anyhow!("cannot close: {e}"))?;
        let mut refusals = 0;
        loop {
            let event = match self.wait(Some(deadline))? {
                Wait::Event(event) => event,
                Wait::Timeout => bail!("timed out closing the BEEP session"),
                Wait::Interrupted => continue,
            };
            match event {
                Event::Message {
                    channel: c, msgno, ..
                } => {
                    self.err(c, msgno, 421, "endpoint is detaching")?;
                }
                Event::ChannelClosed { channel: c, .. } if Some(c) == channel => {
                    channel = None;
                    self.session
                        .close_session(200)
                        .map_err(|e| anyhow!("cannot release the session: {e}"))?;
                }
                Event::CloseRefused { channel: 0, error } => bail!(
                    "the relay refused to release the session: {}",
                    code_text(error.code, &error.text)
                ),
                Event::CloseRefused {
                    channel: refused,
                    error,
                } if Some(refused) == channel => {
                    refusals += 1;
                    if refusals > 5 {
                        bail!(
                            "the relay refused to close the channel: {}",
                            code_text(error.code, &error.text)
                        );
                    }
                    self.session
                        .close_channel(refused, 200)
                        .map_err(|e| anyhow!("cannot close: {e}"))?;
                }
                Event::SessionReleased => break,
                _ => {}
            }
        }
        self.flush()?;
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }
}

/// `CODE` or `CODE TEXT`.
fn code_text(code: u16, text: &str) -> String {
    if text.is_empty() {
        code.to_string()
    } else {
        format!("{code} {text}")
    }
}

/// Outcome of the attach handshake.
#[derive(Debug)]
enum Attach {
    /// Attached; the APEX channel.
    Attached(u32),
    /// The relay answered the attach with an error (already printed).
    Refused,
}

/// Greets, starts the APEX channel with a piggybacked attach as `name` and checks the answer.
/// A refusal prints `error CODE TEXT` on `out`, detaches and returns [`Attach::Refused`].
fn handshake(
    peer: &mut Peer,
    name: &Endpoint,
    io: Duration,
    out: &mut impl Write,
) -> Result<Attach> {
    let deadline = Instant::now() + io;
    loop {
        match peer.wait(Some(deadline))? {
            Wait::Event(Event::Greeting(greeting)) => {
                if !greeting.profiles.iter().any(|p| p == APEX) {
                    bail!(
                        "the relay does not offer the APEX profile (it offers: {})",
                        greeting.profiles.join(" ")
                    );
                }
                break;
            }
            Wait::Event(_) => {}
            Wait::Timeout => bail!("timed out waiting for the relay's BEEP greeting"),
            Wait::Interrupted => bail!("interrupted"),
        }
    }
    let offer = attach_offer(name.as_str(), ATTACH_TRANS_ID);
    let channel = peer
        .session
        .start_channel(vec![offer], None)
        .map_err(|e| anyhow!("cannot start a channel: {e}"))?;
    let mut attach_msgno = None;
    let answer = loop {
        match peer.wait(Some(deadline))? {
            Wait::Event(Event::ChannelStarted {
                channel: c,
                content,
                ..
            }) if c == channel => match content {
                Some(content) => {
                    break parse_piggybacked_answer(&content).map_err(|e| {
                        anyhow!(
                            "unparsable answer to the piggybacked attach ({}): {}",
                            e.text,
                            String::from_utf8_lossy(&content)
                        )
                    })?
                }
                None => {
                    // The relay ignored the piggyback: attach with an ordinary MSG (RFC 3340 §4.2).
                    let msgno = peer
                        .session
                        .send_msg(channel, attach_message(name.as_str(), ATTACH_TRANS_ID))
                        .map_err(|e| anyhow!("cannot send attach: {e}"))?;
                    attach_msgno = Some(msgno);
                }
            },
            Wait::Event(Event::StartRefused { channel: c, error }) if c == channel => bail!(
                "the relay refused to start the APEX profile: {}",
                code_text(error.code, &error.text)
            ),
            Wait::Event(Event::Reply {
                channel: c,
                msgno,
                payload,
                ..
            }) if c == channel && Some(msgno) == attach_msgno => {
                break parse_answer(&payload).map_err(|e| {
                    anyhow!(
                        "unparsable answer to attach ({}): {}",
                        e.text,
                        String::from_utf8_lossy(&payload)
                    )
                })?
            }
            Wait::Event(Event::Message {
                channel: c, msgno, ..
            }) => {
                peer.err(c, msgno, 421, "not attached yet")?;
            }
            Wait::Event(Event::ChannelClosed { channel: c, .. }) if c == channel => {
                bail!("the relay closed the APEX channel")
            }
            Wait::Event(_) => {}
            Wait::Timeout => bail!("timed out waiting for the relay to answer the attach"),
            Wait::Interrupted => bail!("interrupted"),
        }
    };
    match answer {
        Answer::Ok => Ok(Attach::Attached(channel)),
        Answer::Error { code, text } => {
            writeln!(out, "error {}", code_text(code, &text))?;
            out.flush()?;
            eprintln!("apex: the relay refused to attach {name}");
            let _ = peer.close(Some(channel), Instant::now() + io);
            Ok(Attach::Refused)
        }
    }
}

/// Options of `apex attach`.
#[derive(Debug)]
struct AttachOpts {
    name: Endpoint,
    count: Option<u64>,
    idle: Option<Duration>,
    io_timeout: Duration,
}

/// What an incoming MSG turned out to be.
enum AttachMsg {
    /// A data for us, printed and acknowledged.
    Data,
    /// A `terminate` that ended our attachment (answered `ok`).
    Terminated { code: u16, text: String },
    /// Anything else (answered with an error).
    Other,
}

/// Answers a relay's `terminate` (RFC 3340 §4.4.3): true when it ends our attachment.
fn answer_terminate(peer: &mut Peer, channel: u32, msgno: u32, trans_id: u32) -> Result<bool> {
    if trans_id == 0 || trans_id == ATTACH_TRANS_ID {
        peer.rpy_ok(channel, msgno)?;
        peer.flush()?;
        Ok(true)
    } else {
        peer.err(channel, msgno, 550, "unknown transaction-identifier")?;
        Ok(false)
    }
}

/// Handles one MSG in `attach` mode: prints and acknowledges data addressed to `me`.
fn on_attach_msg(
    peer: &mut Peer,
    channel: u32,
    msgno: u32,
    payload: &Bytes,
    me: &Endpoint,
    out: &mut impl Write,
) -> Result<AttachMsg> {
    match parse_incoming(payload) {
        Err(e) => peer.err(channel, msgno, e.code, &e.text)?,
        Ok(Incoming::Data(data) | Incoming::Status { data, .. }) => {
            let ours = data
                .recipients
                .iter()
                .any(|r| Endpoint::parse(&r.identity).is_ok_and(|e| e == *me));
            let to: Vec<&str> = data
                .recipients
                .iter()
                .map(|r| r.identity.as_str())
                .collect();
            if !ours {
                let text = format!("not attached as {}", to.join(", "));
                peer.err(channel, msgno, 550, &text)?;
                return Ok(AttachMsg::Other);
            }
            writeln!(
                out,
                "from={} to={} content={}",
                data.originator.identity,
                to.join(","),
                content_text(&data)
            )?;
            out.flush()?;
            peer.rpy_ok(channel, msgno)?;
            return Ok(AttachMsg::Data);
        }
        Ok(Incoming::Terminate {
            trans_id,
            code,
            text,
        }) => {
            if answer_terminate(peer, channel, msgno, trans_id)? {
                return Ok(AttachMsg::Terminated { code, text });
            }
        }
        Ok(Incoming::Other(_)) => {
            peer.err(channel, msgno, 500, "unexpected operation for an endpoint")?
        }
    }
    Ok(AttachMsg::Other)
}

/// `apex attach`: attaches, prints deliveries until `--count`, `--timeout`, a signal, or the
/// relay ends the attachment.
fn run_attach(
    stream: TcpStream,
    opts: &AttachOpts,
    stop: Arc<AtomicBool>,
    out: &mut impl Write,
) -> Result<Status> {
    let io = opts.io_timeout;
    let mut peer = Peer::initiator(stream, stop, io)?;
    let channel = match handshake(&mut peer, &opts.name, io, out)? {
        Attach::Attached(channel) => channel,
        Attach::Refused => return Ok(Status::Failed),
    };
    writeln!(out, "attached {}", opts.name)?;
    out.flush()?;
    let mut received = 0u64;
    let idle_deadline = || opts.idle.map(|d| Instant::now() + d);
    let mut deadline = idle_deadline();
    loop {
        let event = match peer.wait(deadline)? {
            Wait::Event(event) => event,
            Wait::Timeout | Wait::Interrupted => break,
        };
        deadline = idle_deadline();
        match event {
            Event::Message {
                channel: c,
                msgno,
                payload,
            } => match on_attach_msg(&mut peer, c, msgno, &payload, &opts.name, out)? {
                AttachMsg::Data => {
                    received += 1;
                    if Some(received) == opts.count {
                        break;
                    }
                }
                AttachMsg::Terminated { code, text } => {
                    writeln!(out, "terminated {}", code_text(code, &text))?;
                    out.flush()?;
                    // The attachment is over whatever happens now; detach politely.
                    let _ = peer.close(Some(channel), Instant::now() + io);
                    return Ok(Status::Success);
                }
                AttachMsg::Other => {}
            },
            Event::ChannelClosed { channel: c, .. } if c == channel => {
                eprintln!("apex: the relay closed the APEX channel");
                let _ = peer.close(None, Instant::now() + io);
                return Ok(Status::Success);
            }
            Event::SessionReleased => {
                eprintln!("apex: the relay released the session");
                peer.flush()?;
                return Ok(Status::Success);
            }
            _ => {}
        }
    }
    peer.close(Some(channel), Instant::now() + io)?;
    Ok(Status::Success)
}

/// Options of `apex send`.
#[derive(Debug)]
struct SendOpts {
    from: Endpoint,
    to: Vec<Endpoint>,
    /// The statusRequest transID, when `--status` was given.
    status: Option<u32>,
    text: String,
    status_timeout: Duration,
    io_timeout: Duration,
}

/// The `data` message of `apex send` (RFC 3340 §4.4.4).
fn data_document(from: &Endpoint, to: &[Endpoint], status: Option<u32>, text: &str) -> Bytes {
    let data = DataBuilder::new(from.as_str()).to_all(to.iter().map(Endpoint::as_str));
    match status {
        Some(id) => data.status_request(id).text(text),
        None => data.text(text),
    }
}

/// `apex send`: attaches as the originator, sends one data, reports the answer and, with
/// `--status`, the statusResponse.
fn run_send(
    stream: TcpStream,
    opts: &SendOpts,
    stop: Arc<AtomicBool>,
    out: &mut impl Write,
) -> Result<Status> {
    let io = opts.io_timeout;
    let mut peer = Peer::initiator(stream, stop, io)?;
    let channel = match handshake(&mut peer, &opts.from, io, out)? {
        Attach::Attached(channel) => channel,
        Attach::Refused => return Ok(Status::Failed),
    };
    let payload = data_document(&opts.from, &opts.to, opts.status, &opts.text);
    let data_msgno = peer
        .session
        .send_msg(channel, payload)
        .map_err(|e| anyhow!("cannot send data: {e}"))?;
    let mut accepted = false;
    let mut missing: Vec<&Endpoint> = Vec::new();
    for to in &opts.to {
        if !missing.contains(&to) {
            missing.push(to);
        }
    }
    // Status lines that arrive before the relay's `ok` are printed after `accepted`.
    let mut held: Vec<String> = Vec::new();
    let mut deadline = Instant::now() + io;
    loop {
        if accepted && (opts.status.is_none() || missing.is_empty()) {
            break;
        }
        let event = match peer.wait(Some(deadline))? {
            Wait::Event(event) => event,
            Wait::Timeout if !accepted => {
                bail!("timed out waiting for the relay to answer the data")
            }
            Wait::Timeout => {
                let names: Vec<&str> = missing.iter().map(|e| e.as_str()).collect();
                bail!("timed out waiting for the status of {}", names.join(", "))
            }
            Wait::Interrupted => bail!("interrupted"),
        };
        match event {
            Event::Reply {
                channel: c,
                msgno,
                kind,
                payload,
            } if c == channel && msgno == data_msgno => match parse_answer(&payload) {
                Ok(Answer::Ok) if kind == ReplyKind::Rpy => {
                    writeln!(out, "accepted")?;
                    for line in held.drain(..) {
                        writeln!(out, "{line}")?;
                    }
                    out.flush()?;
                    accepted = true;
                    deadline = Instant::now() + opts.status_timeout;
                }
                Ok(Answer::Error { code, text }) => {
                    writeln!(out, "error {}", code_text(code, &text))?;
                    out.flush()?;
                    let _ = peer.close(Some(channel), Instant::now() + io);
                    return Ok(Status::Failed);
                }
                _ => bail!(
                    "unexpected reply to data: {}",
                    String::from_utf8_lossy(&payload)
                ),
            },
            Event::Message {
                channel: c,
                msgno,
                payload,
            } => match parse_incoming(&payload) {
                Err(e) => peer.err(c, msgno, e.code, &e.text)?,
                Ok(Incoming::Status { response, .. }) => {
                    // The carrying data is answered ok whatever it reports (RFC 3340 §6.2).
                    peer.rpy_ok(c, msgno)?;
                    if Some(response.trans_id) != opts.status {
                        continue;
                    }
                    for d in response.destinations {
                        let line = format!("status {} {}", d.identity, code_text(d.code, &d.text));
                        if let Ok(dest) = Endpoint::parse(&d.identity) {
                            missing.retain(|m| **m != dest);
                        }
                        if accepted {
                            writeln!(out, "{line}")?;
                        } else {
                            held.push(line);
                        }
                    }
                    out.flush()?;
                }
                Ok(Incoming::Data(_)) => {
                    peer.err(c, msgno, 550, "this endpoint only sends (apex send)")?
                }
                Ok(Incoming::Terminate {
                    trans_id,
                    code,
                    text,
                }) => {
                    if answer_terminate(&mut peer, c, msgno, trans_id)? {
                        bail!(
                            "the relay terminated the attachment: {}",
                            code_text(code, &text)
                        );
                    }
                }
                Ok(Incoming::Other(_)) => {
                    peer.err(c, msgno, 500, "unexpected operation for an endpoint")?
                }
            },
            Event::ChannelClosed { channel: c, .. } if c == channel => {
                bail!("the relay closed the APEX channel")
            }
            Event::SessionReleased => bail!("the relay released the session"),
            _ => {}
        }
    }
    peer.close(Some(channel), Instant::now() + io)?;
    Ok(Status::Success)
}

/// The content of a received data as one line of text: the `data-content` body (unescaped
/// text, or its markup when it holds elements), the body of the `cid:` MIME part, or the
/// content URI itself.
fn content_text(data: &Data) -> String {
    match client::content(data) {
        Content::Inline(raw) => data_content_text(raw),
        Content::Part(body) => one_line(&String::from_utf8_lossy(&body)),
        Content::Reference(uri) => uri.to_owned(),
    }
}

fn data_content_text(raw: &Bytes) -> String {
    match xml::parse(raw, XML_DEPTH, XML_ATTRIBUTES) {
        Ok(element) if element.children.is_empty() => one_line(&element.text),
        _ => compact_markup(&inner_markup(raw)),
    }
}

/// Line breaks as `\n` (and lone CRs as `\r`), so one data is one output line.
fn one_line(text: &str) -> String {
    text.replace("\r\n", "\\n")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// The bytes between the start and end tags of an element, as text.
fn inner_markup(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut quote = None;
    let mut start_end = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => {
                start_end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let Some(start_end) = start_end else {
        return String::new();
    };
    if text[..start_end].ends_with('/') {
        return String::new();
    }
    match text.rfind("</") {
        Some(close) if close > start_end => text[start_end + 1..close].to_owned(),
        _ => String::new(),
    }
}

/// Pretty-printed markup on one line: lines trimmed, joined without the indentation.
fn compact_markup(markup: &str) -> String {
    let mut out = String::new();
    for line in markup.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let tight = out.is_empty() || (out.ends_with('>') && line.starts_with('<'));
        if !tight {
            out.push(' ');
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use apex_proto::apex::client::{Destination, StatusResponse};
    use apex_proto::apex::msg::{parse_document, parse_message, ApexLimits, Operation};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    const IO: Duration = Duration::from_secs(5);

    fn limits() -> ApexLimits {
        ApexLimits::default()
    }

    /// A data from `from` to `to` with `content_xml` inline.
    fn data_payload(from: &str, to: &str, content_xml: &str) -> Bytes {
        DataBuilder::new(from).to(to).markup(content_xml)
    }

    /// What the fake relay saw.
    #[derive(Debug, Default)]
    struct Log {
        start_content: Option<Bytes>,
        msgs: Vec<Bytes>,
        replies: Vec<(ReplyKind, Bytes)>,
        released: bool,
    }

    type Respond = Box<dyn FnMut(&Bytes) -> (bool, Bytes, Vec<Bytes>) + Send>;

    /// A one-connection relay: accepts the APEX start answering `piggyback`, then sends
    /// `initial` MSGs; each client MSG is answered by `respond` (ok?, reply, MSGs to send next).
    fn fake_relay(
        piggyback: Option<&'static str>,
        mut initial: Vec<Bytes>,
        mut respond: Respond,
    ) -> (SocketAddr, JoinHandle<Log>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let config = SessionConfig {
                profiles: vec![APEX.to_owned()],
                ..SessionConfig::default()
            };
            let session = Session::new(Role::Listener, config);
            let stop = Arc::new(AtomicBool::new(false));
            let mut peer = Peer::new(stream, session, stop, IO).unwrap();
            let mut log = Log::default();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let event = match peer.wait(Some(deadline)) {
                    Ok(Wait::Event(event)) => event,
                    _ => break,
                };
                match event {
                    Event::StartRequested(request) => {
                        log.start_content = request.profiles[0].content.clone();
                        let channel = peer
                            .session
                            .accept_start(request.id, APEX, piggyback.map(Bytes::from))
                            .unwrap();
                        for msg in initial.drain(..) {
                            peer.session.send_msg(channel, msg).unwrap();
                        }
                    }
                    Event::Message {
                        channel,
                        msgno,
                        payload,
                    } => {
                        log.msgs.push(payload.clone());
                        let (ok, reply, next) = respond(&payload);
                        if ok {
                            peer.session.send_rpy(channel, msgno, reply).unwrap();
                        } else {
                            peer.session.send_err(channel, msgno, reply).unwrap();
                        }
                        for msg in next {
                            peer.session.send_msg(channel, msg).unwrap();
                        }
                    }
                    Event::Reply { kind, payload, .. } => log.replies.push((kind, payload)),
                    Event::SessionReleased => {
                        log.released = true;
                        peer.flush().unwrap();
                        break;
                    }
                    _ => {}
                }
            }
            log
        });
        (addr, handle)
    }

    fn no_msgs() -> Respond {
        Box::new(|_| (false, error_payload(500, "unexpected"), Vec::new()))
    }

    fn stop() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    fn attach_opts(name: &str, count: Option<u64>, idle: Option<Duration>) -> AttachOpts {
        AttachOpts {
            name: ep(name),
            count,
            idle,
            io_timeout: IO,
        }
    }

    const MULTIPART_13_4: &str = "Content-Type: multipart/related; boundary=\"XX\"; start=\"<1@fred.example.com>\"; type=\"application/beep+xml\"\r\n\r\n--XX\r\nContent-Type: application/beep+xml\r\nContent-ID: <1@fred.example.com>\r\n\r\n<data content='cid:2@fred.example.com'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n</data>\r\n--XX\r\nContent-Type: text/plain\r\nContent-ID: <2@fred.example.com>\r\n\r\nhello, barney\r\n--XX--\r\n";

    #[test]
    fn attach_prints_deliveries_and_refuses_other_operations() {
        let bind = Bytes::from_static(
            b"Content-Type: application/beep+xml\r\n\r\n<bind relay='example.com' transID='1' />\r\n",
        );
        let initial = vec![
            bind,
            data_payload("fred@example.com", "wilma@example.com", "not for barney"),
            data_payload("fred@example.com", "barney@example.com", "hello, barney"),
            Bytes::from_static(MULTIPART_13_4.as_bytes()),
        ];
        let (addr, relay) = fake_relay(Some("<ok />"), initial, no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", Some(2), None);
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n\
             from=fred@example.com to=barney@example.com content=hello, barney\n\
             from=fred@example.com to=barney@example.com content=hello, barney\n"
        );
        let log = relay.join().unwrap();
        let attach = parse_document(log.start_content.as_ref().unwrap(), &limits()).unwrap();
        assert_eq!(
            attach,
            Operation::Attach {
                endpoint: "barney@example.com".into(),
                trans_id: 1,
                options: vec![]
            }
        );
        let kinds: Vec<ReplyKind> = log.replies.iter().map(|r| r.0).collect();
        assert_eq!(
            kinds,
            [
                ReplyKind::Err,
                ReplyKind::Err,
                ReplyKind::Rpy,
                ReplyKind::Rpy
            ]
        );
        assert_eq!(
            parse_message(&log.replies[0].1, &limits()).unwrap(),
            Operation::Error {
                code: 500,
                text: "unexpected operation for an endpoint".into()
            }
        );
        assert!(matches!(
            parse_message(&log.replies[1].1, &limits()).unwrap(),
            Operation::Error { code: 550, .. }
        ));
        assert_eq!(log.replies[2].1, ok_payload());
        assert!(log.released, "channel closed and session released");
    }

    #[test]
    fn attach_exits_on_terminate() {
        let terminate = apex_proto::apex::msg::terminate_payload(1, 421, "relay going down");
        let initial = vec![
            data_payload("fred@example.com", "barney@example.com", "a &lt; b"),
            terminate,
        ];
        let (addr, relay) = fake_relay(Some("<ok />"), initial, no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, None);
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n\
             from=fred@example.com to=barney@example.com content=a < b\n\
             terminated 421 relay going down\n"
        );
        let log = relay.join().unwrap();
        assert_eq!(log.replies.len(), 2);
        assert!(log.replies.iter().all(|r| r.0 == ReplyKind::Rpy));
        assert!(log.released);
    }

    #[test]
    fn attach_idle_timeout_detaches_cleanly() {
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, Some(Duration::from_millis(300)));
        let started = Instant::now();
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n"
        );
        assert!(relay.join().unwrap().released);
    }

    #[test]
    fn attach_refused_prints_the_error() {
        let (addr, relay) = fake_relay(
            Some("<error code='554'>already attached</error>"),
            Vec::new(),
            no_msgs(),
        );
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, None);
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Failed);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error 554 already attached\n"
        );
        assert!(relay.join().unwrap().released);
    }

    #[test]
    fn attach_without_piggybacked_answer_falls_back_to_a_msg() {
        let respond: Respond = Box::new(|payload| match parse_message(payload, &limits()) {
            Ok(Operation::Attach { .. }) => (true, ok_payload(), Vec::new()),
            _ => (false, error_payload(500, "?"), Vec::new()),
        });
        let (addr, relay) = fake_relay(None, Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, Some(Duration::from_millis(100)));
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n"
        );
        let log = relay.join().unwrap();
        assert_eq!(log.msgs.len(), 1);
    }

    fn send_opts(to: &[&str], status: Option<u32>, text: &str) -> SendOpts {
        SendOpts {
            from: ep("fred@example.com"),
            to: to.iter().map(|t| ep(t)).collect(),
            status,
            text: text.to_owned(),
            status_timeout: Duration::from_secs(5),
            io_timeout: IO,
        }
    }

    fn status_response(trans_id: u32) -> Bytes {
        // RFC 3340 §6.2, with a second destination that failed.
        let content = format!(
            "\r\n      <statusResponse transID='{trans_id}'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='{trans_id}' />\r\n         </destination>\r\n         <destination identity='wilma@example.com'>\r\n            <reply code='550' transID='{trans_id}'>unknown endpoint identity</reply>\r\n         </destination>\r\n      </statusResponse>\r\n   "
        );
        data_payload("apex=report@example.com", "fred@example.com", &content)
    }

    #[test]
    fn send_with_status_prints_acceptance_and_report() {
        let respond: Respond = Box::new(|payload| {
            let Ok(Operation::Data(data)) = parse_message(payload, &limits()) else {
                return (false, error_payload(501, "not data"), Vec::new());
            };
            let option = &data.options[0];
            assert_eq!(option.internal.as_deref(), Some("statusRequest"));
            (true, ok_payload(), vec![status_response(option.trans_id)])
        });
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(
            &["barney@example.com", "wilma@example.com"],
            Some(86),
            "a < b & 'c'\r\nline two",
        );
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "accepted\n\
             status barney@example.com 250\n\
             status wilma@example.com 550 unknown endpoint identity\n"
        );
        let log = relay.join().unwrap();
        // The attach as the originator, then exactly one data.
        assert!(matches!(
            parse_document(log.start_content.as_ref().unwrap(), &limits()).unwrap(),
            Operation::Attach { ref endpoint, trans_id: 1, .. } if endpoint == "fred@example.com"
        ));
        assert_eq!(log.msgs.len(), 1);
        let Operation::Data(data) = parse_message(&log.msgs[0], &limits()).unwrap() else {
            panic!("not data")
        };
        assert_eq!(data.content, "#Content");
        assert_eq!(data.originator.identity, "fred@example.com");
        let to: Vec<&str> = data
            .recipients
            .iter()
            .map(|r| r.identity.as_str())
            .collect();
        assert_eq!(to, ["barney@example.com", "wilma@example.com"]);
        assert_eq!(data.options[0].trans_id, 86);
        let element = xml::parse(data.data_content.as_ref().unwrap(), 8, 8).unwrap();
        assert_eq!(element.text, "a < b & 'c'\r\nline two");
        // The report was acknowledged with ok, then the session released.
        assert_eq!(log.replies.len(), 1);
        assert_eq!(log.replies[0], (ReplyKind::Rpy, ok_payload()));
        assert!(log.released);
    }

    #[test]
    fn send_without_status_prints_accepted() {
        let respond: Respond = Box::new(|_| (true, ok_payload(), Vec::new()));
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(&["barney@example.com"], None, "hello, barney");
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(String::from_utf8(out).unwrap(), "accepted\n");
        let log = relay.join().unwrap();
        // Byte for byte: fred's data to barney with inline content (RFC 3340 §4.4.4).
        assert_eq!(
            &log.msgs[0][..],
            &b"Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n"[..]
        );
        assert!(log.released);
    }

    #[test]
    fn send_error_prints_code_and_text() {
        let respond: Respond = Box::new(|_| {
            (
                false,
                error_payload(537, "action not authorized"),
                Vec::new(),
            )
        });
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(&["barney@example.com"], Some(7), "x");
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Failed);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error 537 action not authorized\n"
        );
        assert!(relay.join().unwrap().released);
    }

    #[test]
    fn send_status_timeout_is_an_error() {
        let respond: Respond = Box::new(|_| (true, ok_payload(), Vec::new()));
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let mut opts = send_opts(&["barney@example.com"], Some(7), "x");
        opts.status_timeout = Duration::from_millis(200);
        let err = run_send(stream, &opts, stop(), &mut out).unwrap_err();
        assert!(err
            .to_string()
            .contains("timed out waiting for the status of barney@example.com"));
        assert_eq!(String::from_utf8(out).unwrap(), "accepted\n");
        drop(relay.join());
    }

    #[test]
    fn connection_refused_is_reported() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let err = connect(&format!("127.0.0.1:{port}"), IO).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot connect to 127.0.0.1:"),
            "{err}"
        );
    }

    #[test]
    fn content_extraction() {
        let Operation::Data(data) =
            parse_message(&Bytes::from_static(MULTIPART_13_4.as_bytes()), &limits()).unwrap()
        else {
            panic!()
        };
        assert_eq!(content_text(&data), "hello, barney");
        let Operation::Data(report) = parse_message(&status_response(86), &limits()).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            content_text(&report),
            "<statusResponse transID='86'><destination identity='barney@example.com'><reply code='250' transID='86' /></destination><destination identity='wilma@example.com'><reply code='550' transID='86'>unknown endpoint identity</reply></destination></statusResponse>"
        );
        assert_eq!(
            client::status_response(&report),
            Some(StatusResponse {
                trans_id: 86,
                destinations: vec![
                    Destination {
                        identity: "barney@example.com".into(),
                        code: 250,
                        text: String::new()
                    },
                    Destination {
                        identity: "wilma@example.com".into(),
                        code: 550,
                        text: "unknown endpoint identity".into()
                    },
                ],
            })
        );
        let lines = data_payload("a@x", "b@x", "one\r\ntwo<![CDATA[ & three]]>");
        let Operation::Data(lines) = parse_message(&lines, &limits()).unwrap() else {
            panic!()
        };
        assert_eq!(content_text(&lines), "one\\ntwo & three");
        assert_eq!(inner_markup(b"<data-content Name='C' />"), "");
        assert_eq!(
            inner_markup(b"<data-content Name='a>b'>x</data-content>"),
            "x"
        );
    }

    #[test]
    fn data_document_escapes_and_validates() {
        let doc = data_document(
            &ep("o'brien@example.com"),
            &[ep("b&b@example.com")],
            Some(5),
            "<tag> & \"q\"",
        );
        let Operation::Data(data) = parse_message(&doc, &limits()).unwrap() else {
            panic!()
        };
        assert_eq!(data.originator.identity, "o'brien@example.com");
        assert_eq!(data.recipients[0].identity, "b&b@example.com");
        assert_eq!(content_text(&data), "<tag> & \"q\"");
        assert!(check_xml_chars("tab\tok\r\n").is_ok());
        assert!(check_xml_chars("nul\0").is_err());
        let id = status_trans_id();
        assert!((1..=0x7FFF_FFFF).contains(&id));
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "127.0.0.1:913",
            "send",
            "--from",
            "fred@example.com",
            "--to",
            "a@example.com",
            "--to",
            "b@example.com",
            "--status",
            "-",
        ])
        .unwrap();
        assert_eq!(cli.timeout, None);
        let Command::Send {
            to, status, text, ..
        } = cli.command
        else {
            panic!()
        };
        assert_eq!(to.len(), 2);
        assert!(status);
        assert_eq!(text, "-");
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "attach",
            "b@x",
            "--count",
            "3",
            "--timeout",
            "0.5",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Attach { count: Some(3), .. }
        ));
        assert_eq!(cli.timeout, Some(Duration::from_millis(500)));
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "--timeout",
            "2",
            "send",
            "--from",
            "a@x",
            "--to",
            "b@x",
            "hi",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_secs(2)));
        assert!(
            Cli::try_parse_from(["apex", "--relay", "r:1", "attach", "b@x", "--count", "0"])
                .is_err()
        );
    }
}
