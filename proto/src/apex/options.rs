//! APEX option processing (RFC 3340 §5, §5.1; RFC 3342): which options apply at this relay,
//! `mustUnderstand`, and the five understood options - `statusRequest`, `attachOverride`,
//! `dataTiming`, `hold4Endpoint` and `dataHopping`.
//!
//! Pure functions and small values: the relay decides when to call them and does the sending.
//! Nothing here reads a clock. `dataTiming` values are relative milliseconds (MILLISECS,
//! RFC 3342 §6), so callers pass instants of any monotonic millisecond clock of their
//! choosing (`received_at_ms`, `now_ms`); only differences between them are used.
//!
//! Where the relay calls what (RFC 3340 §4.4.4.1 step numbers; RFC 3342 §2.1, §2.2, §4):
//!
//! | Step | Call |
//! |------|------|
//! | attach step 4 | [`attach_options`]; on `override_existing`, [`override_terminate_payload`] |
//! | data step 2 (before `ok`) | [`check_must_understand`] on the per-data options (504 on failure) |
//! | data step 4 / 5.1 | [`check_must_understand`] on originator / recipient options (recipient fails) |
//! | 5.2 forward | [`prepare_forward`] on the per-data options; [`must_remove_before_sending`] on party options; [`edit_payload`]; [`restamp_forward`] as the data leaves the link |
//! | 5.3 local | [`prepare_delivery`]; [`hold_requested`] + [`HoldLimits`]; after the application's answer [`DataTiming::on_ok`] / [`DataTiming::on_deadline`] |
//! | reports | [`status_requests_for`], [`Report::payload`], [`report_payload`] |
//!
//! Reports are built with [`report_payload`], whose layout follows RFC 3340 §6.2 and §9.2.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::apex::client::DataBuilder;
use crate::apex::msg::{ApexOption, Data, OpError, TargetHop};
use crate::beep::mgmt::code;
use crate::xml;

/// Reply codes used by option processing and in reports.
pub mod option_code {
    use crate::apex::msg::apex_code;
    use crate::beep::mgmt::code;

    /// An applicable `mustUnderstand='true'` option is not understood. RFC 3340 §5 only says
    /// "error in processing"; RFC 3340 §5 and §10 leave the code open; apexd answers 504
    /// "parameter not implemented".
    pub const NOT_UNDERSTOOD: u16 = code::NOT_IMPLEMENTED;
    /// Option content that breaks the RFC 3342 §6 DTD (e.g. `noMoreThan='300'`).
    pub const INVALID: u16 = code::PARAMETER_ERROR;
    /// Permanent success in a `statusResponse` (delivered; final hop report, OPT-10).
    pub const DELIVERED: u16 = apex_code::SUCCESS;
    /// Transient success in a `statusResponse` (transient timing report, OPT-13; RFC 3342
    /// §2.2.1 uses 350, which RFC 3340 §10 does not list).
    pub const DELAYED: u16 = 350;
    /// Permanent failure in a `statusResponse` (not attached, unknown endpoint, timing error
    /// report OPT-11, hop limit OPT-17).
    pub const FAILED: u16 = code::ACTION_NOT_TAKEN;
    /// Access denied, in a `statusResponse` (RFC 3340 §6.2, §10).
    pub const DENIED: u16 = apex_code::NOT_AUTHORIZED;
    /// `terminate` code for an attachment overridden by `attachOverride` (RFC 3342 §1, OPT-05).
    pub const OVERRIDDEN: u16 = apex_code::OVERRIDDEN;
}

/// Diagnostic text of the `terminate` sent for an overridden attachment (RFC 3342 §1).
pub const OVERRIDE_TEXT: &str = "attachment overridden";

/// Default [`HoldLimits::max_messages`]: data held for unattached endpoints, all endpoints
/// together.
pub const DEFAULT_MAX_HELD_MESSAGES: usize = 1024;

/// Default [`HoldLimits::max_bytes`]: octets of held payloads, all endpoints together (16 MiB).
pub const DEFAULT_MAX_HELD_BYTES: usize = 16 * 1024 * 1024;

/// Default [`HoldLimits::max_per_originator`]: data of one originator held at once, a quarter
/// of [`DEFAULT_MAX_HELD_MESSAGES`], so that one sender cannot fill the queue (issue 19 item 8).
pub const DEFAULT_MAX_HELD_PER_ORIGINATOR: usize = 256;

/// Default [`HoldLimits::max_hold_ms`]: one hour (issue 19 item 8). RFC 3342 §3 holds data
/// without a `dataTiming` bound indefinitely; RFC 3342 §7 lets administrators limit it
/// (OPT-15), and an unbounded default let held data occupy the queue for ever.
pub const DEFAULT_MAX_HOLD_MS: u64 = 3_600_000;

/// The options this relay understands (OPT-01; RFC 3340 §5.1, RFC 3342 §1-§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnownOption {
    /// `statusRequest` (RFC 3340 §5.1): in `data` or `recipient`, no content.
    StatusRequest,
    /// `attachOverride` (RFC 3342 §1): in `attach`, no content.
    AttachOverride,
    /// `dataTiming` (RFC 3342 §2): in `data`, one `dataTiming` element.
    DataTiming,
    /// `hold4Endpoint` (RFC 3342 §3): in `data`, no content.
    Hold4Endpoint,
    /// `dataHopping` (RFC 3342 §4): in `data`, one `dataHopping` element.
    DataHopping,
}

impl KnownOption {
    /// Every understood option.
    pub const ALL: [KnownOption; 5] = [
        KnownOption::StatusRequest,
        KnownOption::AttachOverride,
        KnownOption::DataTiming,
        KnownOption::Hold4Endpoint,
        KnownOption::DataHopping,
    ];

    /// The IANA-registered name, as written in `internal`.
    pub const fn name(self) -> &'static str {
        match self {
            KnownOption::StatusRequest => "statusRequest",
            KnownOption::AttachOverride => "attachOverride",
            KnownOption::DataTiming => "dataTiming",
            KnownOption::Hold4Endpoint => "hold4Endpoint",
            KnownOption::DataHopping => "dataHopping",
        }
    }

    /// The option registered under `name` (exact, case-sensitive NMTOKEN match).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Which understood option `option` is. Only `internal` names are recognised: no option
    /// named by an `external` URI is understood.
    pub fn of(option: &ApexOption) -> Option<Self> {
        option.internal.as_deref().and_then(Self::from_name)
    }
}

/// Whether this relay understands `option` (it is one of [`KnownOption::ALL`]).
pub fn is_understood(option: &ApexOption) -> bool {
    KnownOption::of(option).is_some()
}

/// This relay's position for the element being processed (RFC 3340 §5 `targetHop`, APEX-35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Received, not yet routed (data steps 2 and 4): `this` and `all` options apply, `final`
    /// ones cannot be known to apply yet.
    Receiving,
    /// Sending the element on to another relay (step 5.2): `this` and `all` apply.
    Intermediate,
    /// Transmitting the element directly to the recipient's application (step 5.3): every
    /// option applies.
    Final,
}

/// Whether `option` is to be processed by this relay at `hop` (APEX-35): `this` by whichever
/// relay receives it (it never travels further), `all` by every relay, `final` only by the
/// delivering relay. Options inside `attach` ignore `targetHop` (APEX-37): see
/// [`attach_options`].
pub fn applies_here(option: &ApexOption, hop: Hop) -> bool {
    match option.target_hop {
        TargetHop::This | TargetHop::All => true,
        TargetHop::Final => hop == Hop::Final,
    }
}

/// OPT-01 / APEX-36: the first option that applies at `hop`, says `mustUnderstand='true'` and is
/// not understood, as an error with code 504 ([`option_code::NOT_UNDERSTOOD`]). Unknown options
/// that do not apply here, or are not `mustUnderstand`, pass. A known option outside the
/// container it is defined for counts as understood (it is simply not acted on).
pub fn check_must_understand(options: &[ApexOption], hop: Hop) -> Result<(), OpError> {
    match options
        .iter()
        .find(|o| o.must_understand && applies_here(o, hop) && !is_understood(o))
    {
        Some(o) => Err(not_understood(o)),
        None => Ok(()),
    }
}

/// Whether `option` must be left out when this relay sends the containing element on at `hop`
/// (APEX-35, RFC 3340 §5): `targetHop='this'` options - processed (or ignored) by this
/// relay - are removed before forwarding to another relay; `final` and `all` are kept. The final
/// relay strips nothing when delivering (APEX-35 "Final relays do not strip options").
pub fn must_remove_before_sending(option: &ApexOption, hop: Hop) -> bool {
    hop != Hop::Final && option.target_hop == TargetHop::This
}

fn not_understood(option: &ApexOption) -> OpError {
    OpError {
        code: option_code::NOT_UNDERSTOOD,
        text: format!("option '{}' not understood", option.name()),
    }
}

fn invalid(text: impl Into<String>) -> OpError {
    OpError {
        code: option_code::INVALID,
        text: text.into(),
    }
}

fn syntax(text: impl Into<String>) -> OpError {
    OpError {
        code: code::SYNTAX_ERROR,
        text: text.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// attachOverride
// ---------------------------------------------------------------------------------------------

/// What the options of an `attach` ask of the relay (attach step 4, APEX-13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttachOptions {
    /// `attachOverride` is present (OPT-05): if an application is already attached as the
    /// endpoint, send it [`override_terminate_payload`] for its attach transID (code 556)
    /// concurrently, skip the 554 duplicate check (step 5) and attach the new application.
    pub override_existing: bool,
}

/// Processes the options of an `attach` (attach step 4). `targetHop` and `transID` are ignored
/// (APEX-37), so every option applies: an unknown `mustUnderstand='true'` option is refused
/// with 504. (The same check suits `bind` options via
/// `check_must_understand(options, Hop::Final)`: the relay receiving a bind is its final hop.)
pub fn attach_options(options: &[ApexOption]) -> Result<AttachOptions, OpError> {
    if let Some(o) = options
        .iter()
        .find(|o| o.must_understand && !is_understood(o))
    {
        return Err(not_understood(o));
    }
    Ok(AttachOptions {
        override_existing: options
            .iter()
            .any(|o| KnownOption::of(o) == Some(KnownOption::AttachOverride)),
    })
}

/// The `terminate` payload (entity headers included) that ends the previous attachment
/// `old_trans_id` on the old application's channel: `<terminate transID='1' code='556'>attachment
/// overridden</terminate>` (RFC 3342 §1).
pub fn override_terminate_payload(old_trans_id: u32) -> Bytes {
    crate::apex::msg::terminate_payload(old_trans_id, option_code::OVERRIDDEN, OVERRIDE_TEXT)
}

// ---------------------------------------------------------------------------------------------
// statusRequest and the report service
// ---------------------------------------------------------------------------------------------

/// The transIDs of the `statusRequest` options that ask this relay, at `hop`, to report on
/// recipient number `recipient` of `data` (OPT-02, APEX-38): per-data ones first, then that
/// recipient's own, duplicates removed. Empty when `data` carries a `statusResponse` (APEX-39,
/// OPT-03: such data must not contain a statusRequest, so one that does is not honoured, which
/// also prevents report loops). Administrative disabling (OPT-04) is the caller's policy.
pub fn status_requests_for(data: &Data, recipient: usize, hop: Hop) -> Vec<u32> {
    status_requests_where(data, recipient, |o| applies_here(o, hop))
}

/// The transIDs of the `statusRequest` options (per-data, then `recipient`'s own) that travel
/// on with data forwarded for `recipient` (index into `data.recipients`): those with
/// `targetHop='final'` or `'all'`, which a later relay answers (RFC 3340 §5; `this` ones are
/// removed when forwarding, APEX-35). Empty for data carrying a `statusResponse` (OPT-03).
pub fn status_requests_onward(data: &Data, recipient: usize) -> Vec<u32> {
    status_requests_where(data, recipient, |o| o.target_hop != TargetHop::This)
}

/// The transIDs of the `statusRequest` options of `data` (per-data, then `recipient`'s own)
/// that `wanted` selects, duplicates removed; none for data carrying a `statusResponse`
/// (OPT-03).
fn status_requests_where(
    data: &Data,
    recipient: usize,
    wanted: impl Fn(&ApexOption) -> bool,
) -> Vec<u32> {
    let own = data
        .recipients
        .get(recipient)
        .map(|r| &r.options[..])
        .unwrap_or_default();
    if (data.options.is_empty() && own.is_empty()) || carries_status_response(data) {
        return Vec::new();
    }
    let mut ids: Vec<u32> = Vec::new();
    for o in data.options.iter().chain(own) {
        if KnownOption::of(o) == Some(KnownOption::StatusRequest)
            && wanted(o)
            && !ids.contains(&o.trans_id)
        {
            ids.push(o.trans_id);
        }
    }
    ids
}

/// The per-data `dataTiming` of `options` that applies at `hop`, when there is one and it
/// parses.
pub fn data_timing(options: &[ApexOption], hop: Hop) -> Option<DataTiming> {
    options
        .iter()
        .find(|o| KnownOption::of(o) == Some(KnownOption::DataTiming) && applies_here(o, hop))
        .and_then(|o| DataTiming::parse(o).ok())
}

/// Whether the content of `data` is a `statusResponse` (a report, RFC 3340 §6.2): the first
/// element inside its `data-content`. Content held in a separate MIME part is not inspected
/// (reports are always embedded).
pub fn carries_status_response(data: &Data) -> bool {
    let Some(dc) = &data.data_content else {
        return false;
    };
    // A child element needs a third '<' besides the element's own start and end tags ('<' is
    // refused in attribute values): plain text content, the common case, stops here.
    if memchr::memchr_iter(b'<', dc).nth(2).is_none() {
        return false;
    }
    let mut reader = Reader::from_reader(&dc[..]);
    if !matches!(reader.read_event(), Ok(Event::Start(_))) {
        return false;
    }
    loop {
        match reader.read_event() {
            Ok(Event::Text(t)) if t.iter().all(u8::is_ascii_whitespace) => {}
            Ok(Event::Comment(_)) => {}
            Ok(Event::Start(s) | Event::Empty(s)) => {
                return s.local_name().as_ref() == b"statusResponse"
            }
            _ => return false,
        }
    }
}

/// The local part of the report service of every domain (RFC 3340 §6.2).
pub const REPORT_SERVICE: &str = "apex=report";

/// The report service of `domain`: `apex=report@<domain>` (RFC 3340 §6.2).
pub fn report_originator(domain: &str) -> String {
    format!("{REPORT_SERVICE}@{domain}")
}

/// One `destination` of a `statusResponse`: a recipient and its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination<'a> {
    /// The recipient reported on.
    pub identity: &'a str,
    /// Its status ([`option_code`]: 250, 350, 537, 550...).
    pub code: u16,
    /// Optional diagnostic (e.g. "unknown endpoint identity"); empty for none.
    pub text: &'a str,
}

/// The `statusResponse` element for option `trans_id`, laid out to sit inside
/// [`DataBuilder::markup`]'s `data-content` laid out as in RFC 3340 §6.2 (leading CRLF and 6-space
/// indent, `reply` carrying the DTD-required `transID`, trailing CRLF and 3 spaces).
pub fn status_response_xml(trans_id: u32, destinations: &[Destination<'_>]) -> String {
    let mut s = format!("\r\n      <statusResponse transID='{trans_id}'>");
    for d in destinations {
        s.push_str("\r\n         <destination identity='");
        s.push_str(&xml::escape(d.identity));
        s.push_str("'>\r\n            <reply code='");
        s.push_str(&format!("{}' transID='{trans_id}'", d.code));
        if d.text.is_empty() {
            s.push_str(" />");
        } else {
            s.push('>');
            s.push_str(&xml::escape(d.text));
            s.push_str("</reply>");
        }
        s.push_str("\r\n         </destination>");
    }
    s.push_str("\r\n      </statusResponse>\r\n   ");
    s
}

/// A complete report `data` payload (entity headers included) from `apex=report@<domain>` to
/// `to` (the originator of the data that asked), content `statusResponse transID=trans_id` with
/// `destinations` (OPT-02, OPT-11, OPT-13, OPT-17). `extra_option`, when given, is an `option`
/// element placed before the `data-content` (the final hop report's new `dataTiming`, OPT-10).
/// Built with [`DataBuilder`], laid out as in RFC 3340 §6.2. A report never
/// carries a `statusRequest` (APEX-39).
pub fn report_payload(
    domain: &str,
    to: &str,
    trans_id: u32,
    destinations: &[Destination<'_>],
    extra_option: Option<&str>,
) -> Bytes {
    let content = status_response_xml(trans_id, destinations);
    let originator = report_originator(domain);
    let data = DataBuilder::new(&originator).to(to);
    match extra_option {
        Some(option) => data.option(option).markup(&content),
        None => data.markup(&content),
    }
}

/// A report the relay must send because of `dataTiming` or `dataHopping` (RFC 3342 §2.1.1,
/// §2.1.2, §2.2.1, §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Which report.
    pub kind: ReportKind,
    /// The transID of the option that asked for it (the `statusResponse` transID).
    pub trans_id: u32,
}

/// The kinds of option-triggered reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// `noLaterThan` exhausted with `reportErrors='true'` (OPT-11): permanent failure, 550.
    TimingError,
    /// `reportAfter` exhausted (OPT-13): transient success, 350; delivery continues.
    TransientTiming,
    /// Delivered with `returnTrip` non-zero (OPT-10): permanent success, 250, and the report
    /// carries a new `dataTiming` whose `noLaterThan` is `return_trip`.
    FinalHop {
        /// The original `returnTrip`, ms.
        return_trip: u32,
    },
    /// `dataHopping` limit reached with `reportErrors='true'` (OPT-17): permanent failure, 550.
    HopLimit,
}

impl Report {
    /// The status code for each reported recipient.
    pub fn code(&self) -> u16 {
        match self.kind {
            ReportKind::TimingError | ReportKind::HopLimit => option_code::FAILED,
            ReportKind::TransientTiming => option_code::DELAYED,
            ReportKind::FinalHop { .. } => option_code::DELIVERED,
        }
    }

    /// The report `data` payload from `apex=report@<domain>` to `to` (the originator of the
    /// data), with one destination per entry of `recipients`. `fresh_trans_id` is the transID of
    /// the new `dataTiming` option of a final hop report; other kinds ignore it.
    pub fn payload(
        &self,
        domain: &str,
        to: &str,
        recipients: &[&str],
        fresh_trans_id: u32,
    ) -> Bytes {
        let code = self.code();
        let destinations: Vec<Destination<'_>> = recipients
            .iter()
            .map(|identity| Destination {
                identity,
                code,
                text: "",
            })
            .collect();
        let option = match self.kind {
            ReportKind::FinalHop { return_trip } => {
                Some(final_hop_option_xml(fresh_trans_id, return_trip))
            }
            _ => None,
        };
        report_payload(domain, to, self.trans_id, &destinations, option.as_deref())
    }
}

/// The new `dataTiming` option of a final hop report (OPT-10): `targetHop='all'`,
/// `mustUnderstand='true'`, a fresh transID, and a `dataTiming` with only `noLaterThan` =
/// the original `returnTrip` (RFC 3342 §2.1.1, in the core's 3-space layout).
pub fn final_hop_option_xml(trans_id: u32, return_trip: u32) -> String {
    format!(
        "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='{trans_id}'>\r\n      <dataTiming noLaterThan='{return_trip}' />\r\n   </option>"
    )
}

// ---------------------------------------------------------------------------------------------
// Option content: parsing and rewriting
// ---------------------------------------------------------------------------------------------

/// The single content element of an option: its attributes and where it sits in `raw`.
struct Child {
    attributes: Vec<(String, String)>,
    span: Range<usize>,
}

/// Finds the one `name` element inside `option` (RFC 3342 §6: "one dataTiming element").
/// Whitespace and comments may surround it; nothing else may.
fn option_child(option: &ApexOption, name: &str) -> Result<Child, OpError> {
    let mut reader = Reader::from_reader(&option.raw[..]);
    let bad = |e: quick_xml::Error| syntax(format!("poorly-formed option: {e}"));
    match reader.read_event().map_err(bad)? {
        Event::Start(_) => {}
        Event::Empty(_) => return Err(invalid(format!("option {name} needs a {name} element"))),
        _ => return Err(invalid("not an option element")),
    }
    let mut found: Option<Child> = None;
    loop {
        let at = reader.buffer_position() as usize;
        match reader.read_event().map_err(bad)? {
            Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {}
            Event::Comment(_) => {}
            Event::Empty(s) if s.name().as_ref() == name.as_bytes() && found.is_none() => {
                let attributes = attributes(&s)?;
                found = Some(Child {
                    attributes,
                    span: at..reader.buffer_position() as usize,
                });
            }
            Event::Start(s) if s.name().as_ref() == name.as_bytes() && found.is_none() => {
                let attributes = attributes(&s)?;
                // EMPTY content model: only whitespace or comments before the end tag.
                loop {
                    match reader.read_event().map_err(bad)? {
                        Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {}
                        Event::Comment(_) => {}
                        Event::End(_) => break,
                        _ => return Err(invalid(format!("{name} is an empty element"))),
                    }
                }
                found = Some(Child {
                    attributes,
                    span: at..reader.buffer_position() as usize,
                });
            }
            Event::End(_) => break,
            Event::Eof => return Err(syntax("unclosed option element")),
            _ => {
                return Err(invalid(format!(
                    "option {name} must contain one {name} element only"
                )))
            }
        }
    }
    found.ok_or_else(|| invalid(format!("option {name} needs a {name} element")))
}

fn attributes(s: &BytesStart<'_>) -> Result<Vec<(String, String)>, OpError> {
    let mut out = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(|e| syntax(format!("bad attribute: {e}")))?;
        let value = a
            .unescape_value()
            .map_err(|e| syntax(format!("bad attribute value: {e}")))?;
        out.push((
            String::from_utf8_lossy(a.key.as_ref()).into_owned(),
            value.into_owned(),
        ));
    }
    Ok(out)
}

/// A decimal in `0..=max`, digits only (no sign, no spaces).
fn bounded(name: &str, value: &str, max: u32) -> Result<u32, OpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("{name}='{value}' is not a number")));
    }
    value
        .parse::<u32>()
        .ok()
        .filter(|v| *v <= max)
        .ok_or_else(|| invalid(format!("{name}='{value}' is out of range 0..{max}")))
}

fn boolean(name: &str, value: &str) -> Result<bool, OpError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(format!("{name} must be true or false"))),
    }
}

/// `option` with its content element (at `span`) replaced by `element`; the start tag, end tag
/// and surrounding whitespace stay byte for byte.
fn splice_option(option: &ApexOption, span: Range<usize>, element: &str) -> ApexOption {
    let raw = &option.raw;
    let mut out = BytesMut::with_capacity(raw.len() + 8);
    out.put_slice(&raw[..span.start]);
    out.put_slice(element.as_bytes());
    out.put_slice(&raw[span.end..]);
    ApexOption {
        raw: out.freeze(),
        ..option.clone()
    }
}

/// MILLISECS upper bound (RFC 3342 §6).
const MAX_MILLISECS: u32 = 2_147_483_647;
/// HOPS upper bound (RFC 3342 §6, OPT-16).
const MAX_HOPS: u32 = 255;

// ---------------------------------------------------------------------------------------------
// dataTiming
// ---------------------------------------------------------------------------------------------

/// A `dataTiming` option's values (RFC 3342 §2, §6; OPT-18). All durations are milliseconds;
/// 0 means "not set".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataTiming {
    /// transID of the carrying option (the transID of any report it causes).
    pub trans_id: u32,
    /// Remaining time within which the data must be delivered; 0 = no limit.
    pub no_later_than: u32,
    /// If non-zero: send a final hop report on delivery, itself bounded by this many ms.
    pub return_trip: u32,
    /// If non-zero: send a transient report when delivery takes longer than this.
    pub report_after: u32,
    /// Send a timing error report when `no_later_than` is exceeded.
    pub report_errors: bool,
}

/// What elapsed time did to a `dataTiming` ([`DataTiming::elapse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingCheck {
    /// Still in time: carry `timing` onward (remaining values); send `report` if any (a
    /// transient timing report when `reportAfter` ran out now).
    Continue {
        /// The values to send on.
        timing: DataTiming,
        /// A transient timing report to send, if `reportAfter` was exhausted.
        report: Option<Report>,
    },
    /// `noLaterThan` exhausted: an error in processing; the data is not sent (OPT-08/09).
    Expired {
        /// A timing error report, when `reportErrors='true'`.
        report: Option<Report>,
    },
}

impl DataTiming {
    /// Reads the `dataTiming` element of `option` (defaults per OPT-18). Out-of-range values,
    /// unknown attributes, or content other than one `dataTiming` element are refused with 501.
    pub fn parse(option: &ApexOption) -> Result<Self, OpError> {
        let child = option_child(option, KnownOption::DataTiming.name())?;
        let mut t = DataTiming {
            trans_id: option.trans_id,
            no_later_than: 0,
            return_trip: 0,
            report_after: 0,
            report_errors: false,
        };
        for (k, v) in &child.attributes {
            match k.as_str() {
                "noLaterThan" => t.no_later_than = bounded(k, v, MAX_MILLISECS)?,
                "returnTrip" => t.return_trip = bounded(k, v, MAX_MILLISECS)?,
                "reportAfter" => t.report_after = bounded(k, v, MAX_MILLISECS)?,
                "reportErrors" => t.report_errors = boolean(k, v)?,
                other => return Err(invalid(format!("dataTiming has no attribute {other}"))),
            }
        }
        Ok(t)
    }

    /// The `dataTiming` element for these values: attributes in DTD order, those at their
    /// default (0 / false) left out, e.g. `<dataTiming noLaterThan='3800' reportErrors='true' />`.
    pub fn element_xml(&self) -> String {
        let mut s = String::from("<dataTiming");
        for (name, v) in [
            ("noLaterThan", self.no_later_than),
            ("returnTrip", self.return_trip),
            ("reportAfter", self.report_after),
        ] {
            if v != 0 {
                s.push_str(&format!(" {name}='{v}'"));
            }
        }
        if self.report_errors {
            s.push_str(" reportErrors='true'");
        }
        s.push_str(" />");
        s
    }

    /// `option` (a `dataTiming` option) carrying these values instead: only its `dataTiming`
    /// element changes; the `option` tags (name, targetHop, transID, localize...) and the
    /// whitespace are kept byte for byte.
    pub fn rewrite(&self, option: &ApexOption) -> Result<ApexOption, OpError> {
        let child = option_child(option, KnownOption::DataTiming.name())?;
        Ok(splice_option(option, child.span, &self.element_xml()))
    }

    /// Subtracts the time spent at this relay, `now_ms - received_at_ms` (RFC 3342 §2.1, §2.2;
    /// OPT-08, OPT-09, OPT-12): call immediately before sending to the next relay or handing the
    /// data to the recipient's application (also when releasing it from the hold queue).
    /// `noLaterThan` reaching 0 or below expires the data; `reportAfter` reaching 0 or below is
    /// set to 0 with a transient report. Expiry takes precedence: data that is dropped gets no
    /// transient report. `returnTrip` is not consumed in transit.
    pub fn elapse(&self, received_at_ms: u64, now_ms: u64) -> TimingCheck {
        let elapsed = now_ms.saturating_sub(received_at_ms);
        let mut next = *self;
        if self.no_later_than != 0 {
            let left = u64::from(self.no_later_than).saturating_sub(elapsed);
            if left == 0 {
                return TimingCheck::Expired {
                    report: self.report(ReportKind::TimingError, self.report_errors),
                };
            }
            next.no_later_than = u32::try_from(left).unwrap_or(MAX_MILLISECS);
        }
        let mut report = None;
        if self.report_after != 0 {
            let left = u64::from(self.report_after).saturating_sub(elapsed);
            next.report_after = u32::try_from(left).unwrap_or(MAX_MILLISECS);
            if left == 0 {
                report = self.report(ReportKind::TransientTiming, true);
            }
        }
        TimingCheck::Continue {
            timing: next,
            report,
        }
    }

    /// When the recipient's `ok` is due, for data handed to its application at `sent_at_ms`
    /// with these (already elapsed) values: `None` without a `noLaterThan` bound (OPT-09).
    /// For a held item, pass the hold start and the values as received to get its expiry.
    pub fn deadline(&self, sent_at_ms: u64) -> Option<u64> {
        (self.no_later_than != 0).then(|| sent_at_ms.saturating_add(u64::from(self.no_later_than)))
    }

    /// When a transient timing report falls due if the data is still undelivered (OPT-12):
    /// `None` when `reportAfter` is 0.
    pub fn report_after_deadline(&self, from_ms: u64) -> Option<u64> {
        (self.report_after != 0).then(|| from_ms.saturating_add(u64::from(self.report_after)))
    }

    /// The recipient's application answered `ok`: a final hop report when `returnTrip` is
    /// non-zero (OPT-09, OPT-10).
    pub fn on_ok(&self) -> Option<Report> {
        self.report(
            ReportKind::FinalHop {
                return_trip: self.return_trip,
            },
            self.return_trip != 0,
        )
    }

    /// [`DataTiming::deadline`] passed without an `ok` (or a held item expired): an error in
    /// processing, reported when `reportErrors='true'` (OPT-09, OPT-11).
    pub fn on_deadline(&self) -> Option<Report> {
        self.report(ReportKind::TimingError, self.report_errors)
    }

    /// [`DataTiming::report_after_deadline`] passed while delivery is still pending: a transient
    /// timing report (OPT-12, OPT-13). Send it once.
    pub fn on_report_after(&self) -> Report {
        Report {
            kind: ReportKind::TransientTiming,
            trans_id: self.trans_id,
        }
    }

    fn report(&self, kind: ReportKind, wanted: bool) -> Option<Report> {
        wanted.then_some(Report {
            kind,
            trans_id: self.trans_id,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// dataHopping
// ---------------------------------------------------------------------------------------------

/// A `dataHopping` option's values (RFC 3342 §4, §6; OPT-16, OPT-18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHopping {
    /// transID of the carrying option.
    pub trans_id: u32,
    /// Remaining relay-to-relay hops, 0..=255; 0 = no limit.
    pub no_more_than: u8,
    /// Send an error report when the limit is hit.
    pub report_errors: bool,
}

/// The `dataHopping` verdict before sending to the next relay ([`DataHopping::on_forward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopCheck {
    /// Send, carrying these values (decremented, or unchanged when unlimited).
    Forward(DataHopping),
    /// The hop limit is reached (loop guard): do not send (OPT-17).
    Drop {
        /// An error report (550), when `reportErrors='true'`.
        report: Option<Report>,
    },
}

impl DataHopping {
    /// Reads the `dataHopping` element of `option` (defaults per OPT-18); `noMoreThan` outside
    /// 0..=255 (OPT-16), unknown attributes or other content are refused with 501.
    pub fn parse(option: &ApexOption) -> Result<Self, OpError> {
        let child = option_child(option, KnownOption::DataHopping.name())?;
        let mut h = DataHopping {
            trans_id: option.trans_id,
            no_more_than: 0,
            report_errors: false,
        };
        for (k, v) in &child.attributes {
            match k.as_str() {
                "noMoreThan" => {
                    h.no_more_than = u8::try_from(bounded(k, v, MAX_HOPS)?).unwrap_or(u8::MAX)
                }
                "reportErrors" => h.report_errors = boolean(k, v)?,
                other => return Err(invalid(format!("dataHopping has no attribute {other}"))),
            }
        }
        Ok(h)
    }

    /// The `dataHopping` element for these values, defaults left out, e.g.
    /// `<dataHopping noMoreThan='1' reportErrors='true' />`.
    pub fn element_xml(&self) -> String {
        let mut s = String::from("<dataHopping");
        if self.no_more_than != 0 {
            s.push_str(&format!(" noMoreThan='{}'", self.no_more_than));
        }
        if self.report_errors {
            s.push_str(" reportErrors='true'");
        }
        s.push_str(" />");
        s
    }

    /// `option` (a `dataHopping` option) carrying these values; only the `dataHopping` element
    /// changes.
    pub fn rewrite(&self, option: &ApexOption) -> Result<ApexOption, OpError> {
        let child = option_child(option, KnownOption::DataHopping.name())?;
        Ok(splice_option(option, child.span, &self.element_xml()))
    }

    /// Immediately before sending to the next relay (step 5.2 only; local delivery never
    /// decrements): `noMoreThan` 0 is unlimited and passes unchanged; otherwise it drops by one,
    /// and reaching 0 means the data is not sent (OPT-17). With `noMoreThan='2'` the first relay
    /// forwards with 1 and the second drops (RFC 3342 §4).
    pub fn on_forward(&self) -> HopCheck {
        match self.no_more_than {
            0 => HopCheck::Forward(*self),
            1 => HopCheck::Drop {
                report: self.report_errors.then_some(Report {
                    kind: ReportKind::HopLimit,
                    trans_id: self.trans_id,
                }),
            },
            n => HopCheck::Forward(DataHopping {
                no_more_than: n - 1,
                ..*self
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-data options at steps 5.2 and 5.3
// ---------------------------------------------------------------------------------------------

/// What to do with a data about to go to the next relay ([`prepare_forward`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Send it with `options` as its per-data options; send `reports` too.
    Send {
        /// The per-data options to transmit, in order: `this` ones removed, `dataTiming` and
        /// `dataHopping` rewritten (new `raw`), everything else as received.
        options: Vec<ApexOption>,
        /// Reports to send (transient timing reports).
        reports: Vec<Report>,
    },
    /// Do not send it (timing expired or hop limit reached); send `reports` (possibly none).
    Drop {
        /// Error reports to send (timing error, hop limit).
        reports: Vec<Report>,
    },
}

/// Step 5.2 for the per-data options of a data received at `received_at_ms` and about to be
/// sent to the next relay at `now_ms` (RFC 3342 §2.1, §2.2): applies the `dataTiming` (OPT-08,
/// OPT-12) and `dataHopping` (OPT-17) options that apply at an intermediate hop, and removes
/// `targetHop='this'` options (APEX-35). `final` options pass untouched. Malformed option
/// content gives 501 (normally already caught at step 2 by the same parsers).
pub fn prepare_forward(
    options: &[ApexOption],
    received_at_ms: u64,
    now_ms: u64,
) -> Result<Forward, OpError> {
    let mut out = Vec::with_capacity(options.len());
    let mut reports = Vec::new();
    let mut dropped = false;
    for o in options {
        if !applies_here(o, Hop::Intermediate) {
            out.push(o.clone());
            continue;
        }
        let keep = !must_remove_before_sending(o, Hop::Intermediate);
        match KnownOption::of(o) {
            Some(KnownOption::DataTiming) => {
                let timing = DataTiming::parse(o)?;
                match timing.elapse(received_at_ms, now_ms) {
                    TimingCheck::Expired { report } => {
                        dropped = true;
                        reports.extend(report);
                    }
                    TimingCheck::Continue {
                        timing: next,
                        report,
                    } => {
                        reports.extend(report);
                        if keep {
                            out.push(if next == timing {
                                o.clone()
                            } else {
                                next.rewrite(o)?
                            });
                        }
                    }
                }
            }
            Some(KnownOption::DataHopping) => {
                let hopping = DataHopping::parse(o)?;
                match hopping.on_forward() {
                    HopCheck::Drop { report } => {
                        dropped = true;
                        reports.extend(report);
                    }
                    HopCheck::Forward(next) => {
                        if keep {
                            out.push(if next == hopping {
                                o.clone()
                            } else {
                                next.rewrite(o)?
                            });
                        }
                    }
                }
            }
            _ => {
                if keep {
                    out.push(o.clone());
                }
            }
        }
    }
    if dropped {
        reports.retain(|r| r.kind != ReportKind::TransientTiming);
        Ok(Forward::Drop { reports })
    } else {
        Ok(Forward::Send {
            options: out,
            reports,
        })
    }
}

/// What to do with a forwarded data as it leaves for the next relay ([`restamp_forward`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restamp {
    /// Send `payload` (its `dataTiming` brought up to date, carried as `option`); send
    /// `report` too (a transient timing report when `reportAfter` ran out meanwhile).
    Send {
        /// The data message to send.
        payload: Bytes,
        /// The `dataTiming` option as it now stands in `payload`.
        option: ApexOption,
        /// Transient timing report to send, if any.
        report: Option<Report>,
    },
    /// `noLaterThan` ran out while the data waited: do not send it; send `report` (a timing
    /// error report, when `reportErrors='true'`).
    Drop {
        /// Timing error report to send, if any.
        report: Option<Report>,
    },
}

/// Step 5.2 once more, immediately before a forwarded data goes to the next relay (RFC 3342
/// §2.1: "immediately prior to sending"; OPT-08, OPT-12): `payload` carries the `dataTiming`
/// `option` whose values held at `stamped_at_ms` (see [`prepare_forward`]); the time since,
/// spent in this relay's queues, is subtracted now, at `now_ms`. Only that option changes.
pub fn restamp_forward(
    payload: &Bytes,
    option: &ApexOption,
    stamped_at_ms: u64,
    now_ms: u64,
) -> Result<Restamp, OpError> {
    let unchanged = |report| Restamp::Send {
        payload: payload.clone(),
        option: option.clone(),
        report,
    };
    if now_ms <= stamped_at_ms {
        return Ok(unchanged(None));
    }
    let timing = DataTiming::parse(option)?;
    match timing.elapse(stamped_at_ms, now_ms) {
        TimingCheck::Expired { report } => Ok(Restamp::Drop { report }),
        TimingCheck::Continue { timing: next, .. } if next == timing => Ok(unchanged(None)),
        TimingCheck::Continue {
            timing: next,
            report,
        } => {
            let Some(at) = memchr::memmem::find(payload, &option.raw) else {
                return Err(invalid("the dataTiming option is not in the data"));
            };
            let rewritten = next.rewrite(option)?;
            let target = payload.slice(at..at + option.raw.len());
            let edited = edit_payload(payload, &[Edit::replace(&target, rewritten.raw.clone())])
                .ok_or_else(|| invalid("the dataTiming option is not in the data"))?;
            Ok(Restamp::Send {
                payload: edited,
                option: rewritten,
                report,
            })
        }
    }
}

/// What to do with a data about to be handed to a local recipient ([`prepare_delivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Deliver it with `options` as its per-data options.
    Deliver {
        /// All per-data options (the final relay strips none), `dataTiming` values updated to
        /// what remains (RFC 3342 §2.1: 60000 queued, delivered as 18000).
        options: Vec<ApexOption>,
        /// Reports to send now (transient timing reports).
        reports: Vec<Report>,
        /// The applicable `dataTiming` values as delivered: arm [`DataTiming::deadline`] and
        /// [`DataTiming::report_after_deadline`] from the send instant, then call
        /// [`DataTiming::on_ok`] or [`DataTiming::on_deadline`].
        timings: Vec<DataTiming>,
    },
    /// Do not deliver (`noLaterThan` exhausted); send `reports` (possibly none).
    Drop {
        /// Timing error reports to send.
        reports: Vec<Report>,
    },
}

/// Step 5.3 for the per-data options of a data received (or queued) at `received_at_ms` and
/// handed to the recipient's application at `now_ms`: applies `dataTiming` (OPT-09, OPT-12).
/// `dataHopping` is not decremented on local delivery (RFC 3342 §4). Every option applies at
/// the final hop and every option is kept.
pub fn prepare_delivery(
    options: &[ApexOption],
    received_at_ms: u64,
    now_ms: u64,
) -> Result<Delivery, OpError> {
    let mut out = Vec::with_capacity(options.len());
    let mut reports = Vec::new();
    let mut timings = Vec::new();
    let mut dropped = false;
    for o in options {
        if KnownOption::of(o) != Some(KnownOption::DataTiming) {
            out.push(o.clone());
            continue;
        }
        let timing = DataTiming::parse(o)?;
        match timing.elapse(received_at_ms, now_ms) {
            TimingCheck::Expired { report } => {
                dropped = true;
                reports.extend(report);
            }
            TimingCheck::Continue {
                timing: next,
                report,
            } => {
                reports.extend(report);
                timings.push(next);
                out.push(if next == timing {
                    o.clone()
                } else {
                    next.rewrite(o)?
                });
            }
        }
    }
    if dropped {
        reports.retain(|r| r.kind != ReportKind::TransientTiming);
        Ok(Delivery::Drop { reports })
    } else {
        Ok(Delivery::Deliver {
            options: out,
            reports,
            timings,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// hold4Endpoint
// ---------------------------------------------------------------------------------------------

/// Whether `options` (per-data) ask this relay, at `hop`, to queue data for an unattached local
/// recipient until an application attaches as it (OPT-14). The option has no attributes or
/// content: its presence activates it (RFC 3342 §3), and a missing `transID`
/// is accepted. It has no duration of its own: the hold lasts until the `dataTiming`
/// `noLaterThan` bound, else indefinitely (see [`HoldLimits::deadline`]).
pub fn hold_requested(options: &[ApexOption], hop: Hop) -> bool {
    options
        .iter()
        .any(|o| KnownOption::of(o) == Some(KnownOption::Hold4Endpoint) && applies_here(o, hop))
}

/// Administrative bounds on the `hold4Endpoint` queue (OPT-15, RFC 3342 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most data held at once, all endpoints together ([`DEFAULT_MAX_HELD_MESSAGES`]).
    pub max_messages: usize,
    /// Most payload octets held at once ([`DEFAULT_MAX_HELD_BYTES`]).
    pub max_bytes: usize,
    /// Most data of one originator held at once ([`DEFAULT_MAX_HELD_PER_ORIGINATOR`]).
    pub max_per_originator: usize,
    /// Longest hold, ms, whatever `dataTiming` says ([`DEFAULT_MAX_HOLD_MS`]); `None` holds
    /// data without a `dataTiming` bound indefinitely, as RFC 3342 §3 says.
    pub max_hold_ms: Option<u64>,
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            max_messages: DEFAULT_MAX_HELD_MESSAGES,
            max_bytes: DEFAULT_MAX_HELD_BYTES,
            max_per_originator: DEFAULT_MAX_HELD_PER_ORIGINATOR,
            max_hold_ms: Some(DEFAULT_MAX_HOLD_MS),
        }
    }
}

impl HoldLimits {
    /// Whether one more item of `size` octets fits when `held_messages` items totalling
    /// `held_bytes` octets are queued. A refused item is treated as undeliverable (the
    /// recipient fails; 550 if a status report is due).
    pub fn admits(&self, held_messages: usize, held_bytes: usize, size: usize) -> bool {
        held_messages < self.max_messages && held_bytes.saturating_add(size) <= self.max_bytes
    }

    /// Whether one more item of an originator that has `held_from_originator` items queued
    /// fits within its share ([`HoldLimits::max_per_originator`]).
    pub fn admits_from(&self, held_from_originator: usize) -> bool {
        held_from_originator < self.max_per_originator
    }

    /// When an item queued at `held_at_ms` must be dropped: the earlier of its `dataTiming`
    /// `noLaterThan` bound (values as received at `held_at_ms`) and [`HoldLimits::max_hold_ms`];
    /// `None` = hold indefinitely. On expiry call [`DataTiming::on_deadline`] for the report.
    pub fn deadline(&self, held_at_ms: u64, timing: Option<&DataTiming>) -> Option<u64> {
        let by_timing = timing.and_then(|t| t.deadline(held_at_ms));
        let by_admin = self.max_hold_ms.map(|m| held_at_ms.saturating_add(m));
        match (by_timing, by_admin) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Applying removals and rewrites to a received payload
// ---------------------------------------------------------------------------------------------

/// One change to a received payload: `target` is an element slice of it (an [`ApexOption::raw`],
/// a [`crate::apex::msg::Party::raw`]...), replaced by `replacement` or removed when `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// The element to change, a slice of the payload being edited.
    pub target: Bytes,
    /// Its new bytes; `None` removes it together with the whitespace before it.
    pub replacement: Option<Bytes>,
}

impl Edit {
    /// Removes `target`.
    pub fn remove(target: &Bytes) -> Self {
        Self {
            target: target.clone(),
            replacement: None,
        }
    }

    /// Replaces `target` by `with` (e.g. a rewritten option's `raw`).
    pub fn replace(target: &Bytes, with: Bytes) -> Self {
        Self {
            target: target.clone(),
            replacement: Some(with),
        }
    }
}

/// `payload` with `edits` applied and every other byte copied as is (APEX-28: content, MIME
/// parts and untouched elements keep their exact bytes). Use it to drop `this` options
/// ([`must_remove_before_sending`]) from the originator, recipients or data, to put rewritten
/// `dataTiming`/`dataHopping` options in place, or to drop recipients routed elsewhere.
/// Targets are located by their position inside `payload` (they must be slices of it, as the
/// parser's `raw` fields are); an edit inside a removed or replaced element is subsumed by it.
/// `None` if a target is empty, not inside `payload`, or partly overlaps another. Without
/// edits the payload itself is returned (no copy).
pub fn edit_payload(payload: &Bytes, edits: &[Edit]) -> Option<Bytes> {
    if edits.is_empty() {
        return Some(payload.clone());
    }
    let base = payload.as_ptr() as usize;
    let mut spans = Vec::with_capacity(edits.len());
    for e in edits {
        let start = (e.target.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(e.target.len())?;
        if e.target.is_empty() || end > payload.len() {
            return None;
        }
        spans.push((start, end, e.replacement.as_ref()));
    }
    spans.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out = BytesMut::with_capacity(payload.len());
    let mut copied = 0;
    for (start, end, replacement) in spans {
        if start < copied {
            if end <= copied {
                continue; // nested in an element already edited
            }
            return None;
        }
        let mut cut = start;
        if replacement.is_none() {
            while cut > copied && matches!(payload[cut - 1], b' ' | b'\t' | b'\r' | b'\n') {
                cut -= 1;
            }
        }
        out.put_slice(&payload[copied..cut]);
        if let Some(r) = replacement {
            out.put_slice(r);
        }
        copied = end;
    }
    out.put_slice(&payload[copied..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apex::msg::{parse_message, ApexLimits, Operation};

    fn parse(payload: &str) -> Operation {
        parse_message(
            &Bytes::copy_from_slice(payload.as_bytes()),
            &ApexLimits::default(),
        )
        .unwrap()
    }

    fn data(payload: &str) -> Data {
        match parse(payload) {
            Operation::Data(d) => d,
            other => panic!("not data: {other:?}"),
        }
    }

    fn option(xml: &str) -> ApexOption {
        let d = data(&format!(
            "Content-Type: application/beep+xml\r\n\r\n<data content='http://x/'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   {xml}\r\n</data>\r\n"
        ));
        d.options.into_iter().next().unwrap()
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    // RFC 3342 §2.1.1 request option, core 3-space layout.
    const TIMING_501: &str = "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='501'>\r\n      <dataTiming noLaterThan='5000' reportAfter='1000' returnTrip='10000'\r\n                  reportErrors='true' />\r\n   </option>";
    // RFC 3342 §4.
    const HOPPING_90: &str = "<option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='90'>\r\n      <dataHopping noMoreThan='2' reportErrors='true' />\r\n   </option>";

    #[test]
    fn opt_01_registry_names() {
        for k in KnownOption::ALL {
            assert_eq!(KnownOption::from_name(k.name()), Some(k));
        }
        assert_eq!(
            KnownOption::from_name("dataHop"),
            None,
            "RFC 3342: no such option"
        );
        assert_eq!(KnownOption::from_name("statusResponse"), None);
        assert_eq!(
            KnownOption::from_name("StatusRequest"),
            None,
            "NMTOKENs are case-sensitive"
        );
        let ext = option("<option external='http://example.com/opt#statusRequest' transID='1' />");
        assert!(!is_understood(&ext));
        assert!(is_understood(&option(
            "<option internal='hold4Endpoint' transID='1' />"
        )));
    }

    #[test]
    fn apex_35_target_hop_applicability() {
        let this = option("<option internal='x' targetHop='this' transID='1' />");
        let fin = option("<option internal='x' transID='1' />");
        let all = option("<option internal='x' targetHop='all' transID='1' />");
        for hop in [Hop::Receiving, Hop::Intermediate, Hop::Final] {
            assert!(applies_here(&this, hop));
            assert!(applies_here(&all, hop));
            assert_eq!(
                applies_here(&fin, hop),
                hop == Hop::Final,
                "default targetHop is final"
            );
        }
        // `this` removed before going to the next relay; the final relay strips nothing.
        assert!(must_remove_before_sending(&this, Hop::Intermediate));
        assert!(!must_remove_before_sending(&this, Hop::Final));
        assert!(!must_remove_before_sending(&fin, Hop::Intermediate));
        assert!(!must_remove_before_sending(&all, Hop::Intermediate));
    }

    #[test]
    fn opt_01_apex_36_must_understand_gives_504() {
        let unknown_mu = option(
            "<option internal='x-secret' targetHop='all' mustUnderstand='true' transID='7' />",
        );
        let err =
            check_must_understand(std::slice::from_ref(&unknown_mu), Hop::Receiving).unwrap_err();
        assert_eq!(err.code, 504);
        assert!(err.text.contains("x-secret"));
        // Not applicable here: a final option at an intermediate relay passes.
        let final_mu = option("<option internal='x-secret' mustUnderstand='true' transID='7' />");
        assert!(check_must_understand(std::slice::from_ref(&final_mu), Hop::Intermediate).is_ok());
        assert_eq!(
            check_must_understand(&[final_mu], Hop::Final)
                .unwrap_err()
                .code,
            504
        );
        // mustUnderstand false: ignored.
        let unknown = option("<option internal='x-secret' targetHop='all' transID='7' />");
        assert!(check_must_understand(&[unknown], Hop::Final).is_ok());
        // Understood options pass; external URIs are never understood.
        assert!(
            check_must_understand(&[option(TIMING_501), option(HOPPING_90)], Hop::Final).is_ok()
        );
        let ext = option(
            "<option external='urn:x:y' targetHop='this' mustUnderstand='true' transID='1' />",
        );
        assert_eq!(
            check_must_understand(&[ext], Hop::Receiving)
                .unwrap_err()
                .code,
            504
        );
    }

    #[test]
    fn opt_05_attach_override_digest_example() {
        // RFC 3342 §1: app #2's attach, payload 152.
        let attach = "Content-Type: application/beep+xml\r\n\r\n<attach endpoint='fred@example.com' transID='2'>\r\n   <option internal='attachOverride' transID='3' />\r\n</attach>\r\n";
        assert_eq!(attach.len(), 152);
        let Operation::Attach { options, .. } = parse(attach) else {
            panic!()
        };
        assert_eq!(
            attach_options(&options).unwrap(),
            AttachOptions {
                override_existing: true
            }
        );
        // The terminate sent to app #1 for its attach transID 1, payload 107.
        let term = override_terminate_payload(1);
        assert_eq!(
            text(&term),
            "Content-Type: application/beep+xml\r\n\r\n<terminate transID='1' code='556'>attachment overridden</terminate>\r\n"
        );
        assert_eq!(term.len(), 107);
        assert!(matches!(
            parse(text(&term)),
            Operation::Terminate {
                trans_id: 1,
                code: 556,
                ..
            }
        ));
        assert_eq!(attach_options(&[]).unwrap(), AttachOptions::default());
    }

    #[test]
    fn apex_37_attach_ignores_target_hop() {
        let attach = "Content-Type: application/beep+xml\r\n\r\n<attach endpoint='fred@example.com' transID='2'><option internal='x' targetHop='final' mustUnderstand='true' transID='9' /></attach>";
        let Operation::Attach { options, .. } = parse(attach) else {
            panic!()
        };
        assert_eq!(attach_options(&options).unwrap_err().code, 504);
        // attachOverride with an odd targetHop still counts.
        let attach = "Content-Type: application/beep+xml\r\n\r\n<attach endpoint='f@x' transID='2'><option internal='attachOverride' targetHop='this' /></attach>";
        let Operation::Attach { options, .. } = parse(attach) else {
            panic!()
        };
        assert!(attach_options(&options).unwrap().override_existing);
    }

    const REQUEST_13_3: &str = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com'>\r\n      <option internal='statusRequest' transID='86' />\r\n   </recipient>\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n";
    const REPORT_13_3: &str = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='86'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='86' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\n";

    #[test]
    fn opt_02_apex_38_status_report_bytes_of_13_3() {
        assert_eq!(REQUEST_13_3.len(), 302);
        assert_eq!(REPORT_13_3.len(), 416);
        let d = data(REQUEST_13_3);
        // Per-recipient statusRequest, default targetHop final: only the delivering relay.
        assert_eq!(status_requests_for(&d, 0, Hop::Final), vec![86]);
        assert!(status_requests_for(&d, 0, Hop::Intermediate).is_empty());
        let dest = [Destination {
            identity: &d.recipients[0].identity,
            code: option_code::DELIVERED,
            text: "",
        }];
        let via_data_payload = DataBuilder::new(&report_originator("example.com"))
            .to(&d.originator.identity)
            .markup(&status_response_xml(86, &dest));
        assert_eq!(text(&via_data_payload), REPORT_13_3);
        assert_eq!(
            text(&report_payload(
                "example.com",
                &d.originator.identity,
                86,
                &dest,
                None
            )),
            REPORT_13_3
        );
        // The report parses and is recognised as a statusResponse (APEX-39).
        let report = data(REPORT_13_3);
        assert!(carries_status_response(&report));
        assert!(!carries_status_response(&d));
    }

    #[test]
    fn opt_02_per_data_request_of_13_5_and_trace() {
        let forwarded = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@rubble.com' />\r\n   <option internal='statusRequest' transID='86' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n";
        assert_eq!(forwarded.len(), 283);
        let d = data(forwarded);
        assert_eq!(status_requests_for(&d, 0, Hop::Final), vec![86]);
        assert!(status_requests_for(&d, 0, Hop::Intermediate).is_empty());
        // targetHop='all' gives a trace: every relay reports; duplicates collapse.
        let trace = forwarded.replace(
            "<option internal='statusRequest' transID='86' />",
            "<option internal='statusRequest' targetHop='all' transID='86' />",
        );
        let d = data(&trace);
        assert_eq!(status_requests_for(&d, 0, Hop::Intermediate), vec![86]);
        assert_eq!(
            status_requests_for(&d, 5, Hop::Intermediate),
            vec![86],
            "index out of range: per-data only"
        );
    }

    #[test]
    fn opt_03_apex_39_no_status_request_honoured_in_a_report() {
        let bad = REPORT_13_3.replace(
            "   <data-content",
            "   <option internal='statusRequest' transID='9' />\r\n   <data-content",
        );
        let d = data(&bad);
        assert!(carries_status_response(&d));
        assert!(status_requests_for(&d, 0, Hop::Final).is_empty());
        // Text content or another element is not a statusResponse.
        assert!(!carries_status_response(&data(
            &REPORT_13_3.replace("statusResponse", "other")
        )));
    }

    #[test]
    fn status_response_with_diagnostic_and_escaping() {
        let xml = status_response_xml(
            7,
            &[
                Destination {
                    identity: "b'x@example.com",
                    code: 550,
                    text: "unknown endpoint identity",
                },
                Destination {
                    identity: "c@example.com",
                    code: 537,
                    text: "",
                },
            ],
        );
        assert_eq!(
            xml,
            "\r\n      <statusResponse transID='7'>\r\n         <destination identity='b&apos;x@example.com'>\r\n            <reply code='550' transID='7'>unknown endpoint identity</reply>\r\n         </destination>\r\n         <destination identity='c@example.com'>\r\n            <reply code='537' transID='7' />\r\n         </destination>\r\n      </statusResponse>\r\n   "
        );
    }

    #[test]
    fn opt_18_data_timing_parse_and_defaults() {
        let t = DataTiming::parse(&option(TIMING_501)).unwrap();
        assert_eq!(
            t,
            DataTiming {
                trans_id: 501,
                no_later_than: 5000,
                return_trip: 10000,
                report_after: 1000,
                report_errors: true
            }
        );
        let d = DataTiming::parse(&option(
            "<option internal='dataTiming' targetHop='all' transID='3'><dataTiming /></option>",
        ))
        .unwrap();
        assert_eq!(
            (
                d.no_later_than,
                d.return_trip,
                d.report_after,
                d.report_errors
            ),
            (0, 0, 0, false)
        );
        assert_eq!(d.element_xml(), "<dataTiming />");
        let explicit = "<option internal='dataTiming' transID='3'><dataTiming noLaterThan='2147483647'></dataTiming></option>";
        assert_eq!(
            DataTiming::parse(&option(explicit)).unwrap().no_later_than,
            2_147_483_647
        );
        for bad in [
            "<option internal='dataTiming' transID='3' />",
            "<option internal='dataTiming' transID='3'><dataTiming noLaterThan='2147483648' /></option>",
            "<option internal='dataTiming' transID='3'><dataTiming noLaterThan='-1' /></option>",
            "<option internal='dataTiming' transID='3'><dataTiming noLaterThan='+5' /></option>",
            "<option internal='dataTiming' transID='3'><dataTiming reportErrors='yes' /></option>",
            "<option internal='dataTiming' transID='3'><dataTiming deadline='5' /></option>",
            "<option internal='dataTiming' transID='3'><dataTiming /><dataTiming /></option>",
            "<option internal='dataTiming' transID='3'>late<dataTiming /></option>",
            "<option internal='dataTiming' transID='3'><dataTiming><x /></dataTiming></option>",
        ] {
            assert_eq!(DataTiming::parse(&option(bad)).unwrap_err().code, 501, "{bad}");
        }
    }

    #[test]
    fn opt_08_opt_12_forwarding_subtracts_and_rewrites() {
        let o = option(TIMING_501);
        // 1200 ms at this relay: noLaterThan 3800 left, reportAfter exhausted -> 0 + report 350.
        let Forward::Send { options, reports } =
            prepare_forward(std::slice::from_ref(&o), 10_000, 11_200).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            text(&options[0].raw),
            "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='501'>\r\n      <dataTiming noLaterThan='3800' returnTrip='10000' reportErrors='true' />\r\n   </option>"
        );
        assert_eq!(
            reports,
            vec![Report {
                kind: ReportKind::TransientTiming,
                trans_id: 501
            }]
        );
        assert_eq!(reports[0].code(), 350);
        // The rewritten option parses back (next relay) with the remaining values.
        let next = DataTiming::parse(&options[0]).unwrap();
        assert_eq!(
            (next.no_later_than, next.report_after, next.return_trip),
            (3800, 0, 10000)
        );
        // OPT-12: with reportAfter at 0, the next relay does not report again.
        let Forward::Send { reports, .. } = prepare_forward(&options, 0, 500).unwrap() else {
            panic!()
        };
        assert!(reports.is_empty());
        // Quick hop: nothing runs out, no report.
        let Forward::Send { options, reports } =
            prepare_forward(std::slice::from_ref(&o), 0, 200).unwrap()
        else {
            panic!()
        };
        assert!(reports.is_empty());
        assert!(text(&options[0].raw).contains("<dataTiming noLaterThan='4800' returnTrip='10000' reportAfter='800' reportErrors='true' />"));
    }

    #[test]
    fn opt_08_opt_11_expiry_drops_with_timing_error_report() {
        let o = option(TIMING_501);
        // Exactly noLaterThan elapsed: <= 0 -> not sent; 550 report (reportErrors), no 350.
        let verdict = prepare_forward(std::slice::from_ref(&o), 0, 5000).unwrap();
        assert_eq!(
            verdict,
            Forward::Drop {
                reports: vec![Report {
                    kind: ReportKind::TimingError,
                    trans_id: 501
                }]
            }
        );
        let quiet = option("<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='4'><dataTiming noLaterThan='10' /></option>");
        assert_eq!(
            prepare_forward(&[quiet], 0, 11).unwrap(),
            Forward::Drop { reports: vec![] }
        );
        // The error report's bytes (OPT-11).
        let r = Report {
            kind: ReportKind::TimingError,
            trans_id: 501,
        };
        let payload = r.payload(
            "example.com",
            "fred@example.com",
            &["barney@example.com"],
            0,
        );
        let d = data(text(&payload));
        assert_eq!(d.originator.identity, "apex=report@example.com");
        assert!(d.options.is_empty());
        assert!(text(&payload).contains("<statusResponse transID='501'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='550' transID='501' />"));
    }

    #[test]
    fn apex_35_forward_removes_this_and_keeps_final_untouched() {
        let this = option("<option internal='x-local' targetHop='this' transID='1' />");
        let fin_timing = option(
            "<option internal='dataTiming' transID='2'><dataTiming noLaterThan='5' /></option>",
        );
        let all = option("<option internal='x-all' targetHop='all' transID='3' />");
        let Forward::Send { options, reports } =
            prepare_forward(&[this, fin_timing.clone(), all.clone()], 0, 1_000_000).unwrap()
        else {
            panic!()
        };
        // `final` dataTiming does not apply at an intermediate hop: neither expired nor changed.
        assert_eq!(options, vec![fin_timing, all]);
        assert!(reports.is_empty());
        // An unlimited dataTiming/dataHopping keeps its exact bytes.
        let unlimited = option("<option internal='dataHopping' targetHop='all' transID='4'>\r\n <dataHopping   noMoreThan='0'/>\r\n</option>");
        let Forward::Send { options, .. } =
            prepare_forward(std::slice::from_ref(&unlimited), 0, 9).unwrap()
        else {
            panic!()
        };
        assert_eq!(options[0].raw, unlimited.raw);
    }

    #[test]
    fn opt_16_opt_17_data_hopping_example() {
        let o = option(HOPPING_90);
        let h = DataHopping::parse(&o).unwrap();
        assert_eq!(
            h,
            DataHopping {
                trans_id: 90,
                no_more_than: 2,
                report_errors: true
            }
        );
        // Relay A: 2 -> 1, forwarded.
        let Forward::Send { options, reports } =
            prepare_forward(std::slice::from_ref(&o), 0, 0).unwrap()
        else {
            panic!()
        };
        assert!(reports.is_empty());
        assert_eq!(
            text(&options[0].raw),
            "<option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='90'>\r\n      <dataHopping noMoreThan='1' reportErrors='true' />\r\n   </option>"
        );
        // Relay B: would reach 0 -> not sent, error report 550.
        let verdict = prepare_forward(&options, 0, 0).unwrap();
        let Forward::Drop { reports } = verdict else {
            panic!()
        };
        assert_eq!(
            reports,
            vec![Report {
                kind: ReportKind::HopLimit,
                trans_id: 90
            }]
        );
        assert_eq!(reports[0].code(), 550);
        // Range 0..255 (OPT-16).
        let max = option("<option internal='dataHopping' targetHop='all' transID='1'><dataHopping noMoreThan='255' /></option>");
        assert_eq!(DataHopping::parse(&max).unwrap().no_more_than, 255);
        let over = option("<option internal='dataHopping' targetHop='all' transID='1'><dataHopping noMoreThan='256' /></option>");
        assert_eq!(DataHopping::parse(&over).unwrap_err().code, 501);
        // Without reportErrors: silently dropped.
        let one = option("<option internal='dataHopping' targetHop='all' transID='1'><dataHopping noMoreThan='1' /></option>");
        assert_eq!(
            prepare_forward(&[one], 0, 0).unwrap(),
            Forward::Drop { reports: vec![] }
        );
    }

    #[test]
    fn opt_09_delivery_updates_remaining_time_and_keeps_hops() {
        // RFC 3342 §2.1: queued with 60000, delivered carrying 18000.
        let timing = option("<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='5'><dataTiming noLaterThan='60000' returnTrip='10000' /></option>");
        let hopping = option(HOPPING_90);
        let hold = option("<option internal='hold4Endpoint' />");
        let opts = [timing, hopping.clone(), hold.clone()];
        assert!(hold_requested(&opts, Hop::Final));
        assert!(
            !hold_requested(&opts, Hop::Intermediate),
            "default targetHop final"
        );
        let Delivery::Deliver {
            options,
            reports,
            timings,
        } = prepare_delivery(&opts, 1_000, 43_000).unwrap()
        else {
            panic!()
        };
        assert!(reports.is_empty());
        assert_eq!(
            text(&options[0].raw),
            "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='5'><dataTiming noLaterThan='18000' returnTrip='10000' /></option>"
        );
        assert_eq!(
            options[1], hopping,
            "local delivery does not decrement dataHopping"
        );
        assert_eq!(options[2], hold);
        let t = timings[0];
        assert_eq!(t.deadline(100), Some(18_100));
        assert_eq!(t.on_deadline(), None, "no reportErrors");
        assert_eq!(
            t.on_ok(),
            Some(Report {
                kind: ReportKind::FinalHop { return_trip: 10000 },
                trans_id: 5
            })
        );
        // Too late: not delivered.
        assert_eq!(
            prepare_delivery(&opts, 1_000, 61_000).unwrap(),
            Delivery::Drop { reports: vec![] }
        );
    }

    #[test]
    fn opt_12_report_after_at_local_delivery() {
        let t = DataTiming::parse(&option(TIMING_501)).unwrap();
        assert_eq!(t.report_after_deadline(50), Some(1050));
        assert_eq!(
            t.on_report_after(),
            Report {
                kind: ReportKind::TransientTiming,
                trans_id: 501
            }
        );
        assert_eq!(
            t.on_deadline(),
            Some(Report {
                kind: ReportKind::TimingError,
                trans_id: 501
            })
        );
        let TimingCheck::Continue { timing, report } = t.elapse(0, 1000) else {
            panic!()
        };
        assert_eq!(timing.report_after, 0);
        assert_eq!(report.map(|r| r.code()), Some(350));
        assert_eq!(timing.report_after_deadline(0), None, "reported once");
        // A clock that went backwards counts as no time spent.
        assert_eq!(
            t.elapse(100, 50),
            TimingCheck::Continue {
                timing: t,
                report: None
            }
        );
    }

    #[test]
    fn opt_10_final_hop_report() {
        let t = DataTiming::parse(&option(TIMING_501)).unwrap();
        let report = t.on_ok().unwrap();
        assert_eq!(report.code(), 250);
        let payload = report.payload(
            "example.com",
            "fred@example.com",
            &["barney@example.com"],
            502,
        );
        let expected = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='502'>\r\n      <dataTiming noLaterThan='10000' />\r\n   </option>\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='501'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='501' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\n";
        assert_eq!(text(&payload), expected);
        let d = data(expected);
        assert!(carries_status_response(&d));
        let new = DataTiming::parse(&d.options[0]).unwrap();
        assert_eq!(
            new,
            DataTiming {
                trans_id: 502,
                no_later_than: 10000,
                return_trip: 0,
                report_after: 0,
                report_errors: false
            }
        );
        assert_eq!(d.options[0].target_hop, TargetHop::All);
        assert!(d.options[0].must_understand);
        // returnTrip 0: no final hop report.
        let plain = DataTiming {
            return_trip: 0,
            ..t
        };
        assert_eq!(plain.on_ok(), None);
    }

    #[test]
    fn opt_14_opt_15_hold_limits() {
        let l = HoldLimits::default();
        assert_eq!(l.max_messages, DEFAULT_MAX_HELD_MESSAGES);
        assert_eq!(l.max_bytes, DEFAULT_MAX_HELD_BYTES);
        assert!(l.admits(0, 0, 1000));
        assert!(!l.admits(DEFAULT_MAX_HELD_MESSAGES, 0, 1));
        assert!(l.admits(0, DEFAULT_MAX_HELD_BYTES - 10, 10));
        assert!(!l.admits(0, DEFAULT_MAX_HELD_BYTES - 10, 11));
        // One originator's share (issue 19 item 8).
        assert_eq!(l.max_per_originator, DEFAULT_MAX_HELD_PER_ORIGINATOR);
        assert!(l.max_per_originator < l.max_messages);
        assert!(l.admits_from(DEFAULT_MAX_HELD_PER_ORIGINATOR - 1));
        assert!(!l.admits_from(DEFAULT_MAX_HELD_PER_ORIGINATOR));
        // No dataTiming bound: held for the default administrative cap, an hour (issue 19
        // item 8, OPT-15)...
        assert_eq!(l.deadline(5, None), Some(5 + DEFAULT_MAX_HOLD_MS));
        // ... and, without that cap, indefinitely (OPT-14).
        let uncapped = HoldLimits {
            max_hold_ms: None,
            ..l
        };
        assert_eq!(uncapped.deadline(5, None), None);
        let t = DataTiming {
            trans_id: 1,
            no_later_than: 60_000,
            return_trip: 0,
            report_after: 0,
            report_errors: true,
        };
        assert_eq!(l.deadline(5, Some(&t)), Some(60_005));
        let capped = HoldLimits {
            max_hold_ms: Some(1_000),
            ..l
        };
        assert_eq!(capped.deadline(5, Some(&t)), Some(1_005));
        assert_eq!(capped.deadline(5, None), Some(1_005));
    }

    #[test]
    fn apex_28_edit_payload_keeps_other_bytes() {
        let payload = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com'>\r\n      <option internal='x-o' targetHop='this' transID='1' />\r\n   </originator>\r\n   <recipient identity='barney@rubble.com' />\r\n   <recipient identity='wilma@example.com' />\r\n   <option internal='x-d' targetHop='this' transID='2' />\r\n   " ;
        let payload = format!("{payload}{HOPPING_90}\r\n   <data-content Name='Content'>hello, <b>barney</b></data-content>\r\n</data>\r\n");
        let d = data(&payload);
        let Forward::Send { options, .. } = prepare_forward(&d.options, 0, 0).unwrap() else {
            panic!()
        };
        assert_eq!(options.len(), 1);
        let mut edits: Vec<Edit> = d
            .originator
            .options
            .iter()
            .chain(&d.options)
            .filter(|o| must_remove_before_sending(o, Hop::Intermediate))
            .map(|o| Edit::remove(&o.raw))
            .collect();
        edits.push(Edit::replace(&d.options[1].raw, options[0].raw.clone()));
        edits.push(Edit::remove(&d.recipients[1].raw));
        let out = edit_payload(d.payload(), &edits).unwrap();
        assert_eq!(
            text(&out),
            "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com'>\r\n   </originator>\r\n   <recipient identity='barney@rubble.com' />\r\n   <option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='90'>\r\n      <dataHopping noMoreThan='1' reportErrors='true' />\r\n   </option>\r\n   <data-content Name='Content'>hello, <b>barney</b></data-content>\r\n</data>\r\n"
        );
        let again = data(text(&out));
        assert_eq!(again.recipients.len(), 1);
        assert_eq!(again.data_content, d.data_content);
        // Nested edits are subsumed; no edits: the same buffer.
        let nested = [
            Edit::remove(&d.originator.raw),
            Edit::remove(&d.originator.options[0].raw),
        ];
        assert!(edit_payload(d.payload(), &nested).is_some());
        let same = edit_payload(d.payload(), &[]).unwrap();
        assert_eq!(same.as_ptr(), d.payload().as_ptr());
        // A target from another buffer is refused.
        let foreign = Bytes::from_static(b"<option internal='x' transID='1' />");
        assert_eq!(edit_payload(d.payload(), &[Edit::remove(&foreign)]), None);
    }
}
