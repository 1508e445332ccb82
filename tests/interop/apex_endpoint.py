#!/usr/bin/env python3
"""Independent APEX endpoint (RFC 3340) for interoperability tests of the apexd relay.

Written to the protocol specifications (RFC 3340, RFC 3080, RFC 3081), not from the relay's
source.  The BEEP layer (framing, seqno and window accounting, reply ordering, channel 0) is the
independent initiator in beep_client.py; this module adds what an APEX endpoint needs on top of
it: MSGs initiated by the relay on APEX channels (data deliveries, status reports, terminate),
piggybacked attach at channel creation, and the endpoint's own attach/data/terminate exchanges.

Endpoint behaviour (RFC 3340 §4.4.4.2, §4.4.3): every relay MSG is answered at once, in order;
``data`` naming one of our attached endpoints as a recipient gets RPY ``<ok />``, other data gets
ERR 550; ``terminate`` of a live attach transID (or 0) gets RPY ``<ok />``, of an unknown transID
ERR 550.  Anything unexpected from the relay is also recorded and fails the scenario.

Usage:
    apex_endpoint.py --host 127.0.0.1 --port PORT SCENARIO [options]
    apex_endpoint.py --selftest
Scenarios:
    attach-send-receive --domain D
    errors --domain D
    status --domain D
    send --from A --to B --text T
    receive --name B --count N
Exit status 0 on success ("OK: ..." on stdout), 1 on failure ("FAIL: ..." on stderr).
Standard library only (Python 3.11).
"""
import argparse
import base64
import binascii
import collections
import ipaddress
import os
import select
import socket
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from email import policy as email_policy
from email.parser import BytesParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from beep_client import (  # noqa: E402  (path set up above)
    APEX, XML_CT, BeepError, Channel, Reply, Session, encode, Frame, FrameParser, expect_rpy,
    mime, parse_error, split_mime,
)

# --------------------------------------------------------------------------- APEX documents


def esc_attr(value: str) -> str:
    """Escape a value for a single-quoted XML attribute."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;"))


def esc_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def attach_doc(endpoint: str, trans_id: int) -> str:
    return f"<attach endpoint='{esc_attr(endpoint)}' transID='{trans_id}' />"


def terminate_doc(trans_id: int) -> str:
    return f"<terminate transID='{trans_id}' />"


def start_attach_body(number: int, endpoint: str, trans_id: int) -> str:
    """<start> with a piggybacked attach as CDATA (RFC 3340 §4.2)."""
    return (f"<start number='{number}'>\r\n"
            f"   <profile uri='{APEX}'>\r\n"
            f"      <![CDATA[{attach_doc(endpoint, trans_id)}]]>\r\n"
            f"   </profile>\r\n"
            f"</start>\r\n")


def data_doc(originator: str, recipient: str, text: str, recipient_option: str = "") -> str:
    """A data element with inline content (RFC 3340 §4.4.4): one element a line, 3-space indent."""
    if recipient_option:
        rcpt = (f"   <recipient identity='{esc_attr(recipient)}'>\r\n"
                f"      {recipient_option}\r\n"
                f"   </recipient>\r\n")
    else:
        rcpt = f"   <recipient identity='{esc_attr(recipient)}' />\r\n"
    return ("<data content='#Content'>\r\n"
            f"   <originator identity='{esc_attr(originator)}' />\r\n"
            f"{rcpt}"
            f"   <data-content Name='Content'>{esc_text(text)}</data-content>\r\n"
            "</data>\r\n")


def xml_payload(doc: str) -> bytes:
    """A control-document-only APEX message (RFC 3340 §4.1)."""
    if not doc.endswith("\r\n"):
        doc += "\r\n"
    return mime(XML_CT, doc)


OK_PAYLOAD = xml_payload("<ok />")


def error_payload(code: int, text: str) -> bytes:
    return xml_payload(f"<error code='{code}'>{esc_text(text)}</error>")


def parse_piggyback(profile: ET.Element, what: str) -> ET.Element:
    """The APEX answer carried in the RPY-to-start's profile element: CDATA, escaped or base64."""
    text = profile.text or ""
    if profile.get("encoding", "none") == "base64":
        try:
            text = base64.b64decode("".join(text.split()), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise BeepError(f"{what}: bad base64 piggybacked reply: {e}") from None
    elif profile.get("encoding", "none") != "none":
        raise BeepError(f"{what}: unknown profile encoding {profile.get('encoding')!r}")
    text = text.strip()
    if not text:
        raise BeepError(f"{what}: the relay returned no piggybacked answer to the attach "
                        f"(profile element is empty; RFC 3080 §2.3.1.2, RFC 3340 §4.2)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise BeepError(f"{what}: piggybacked reply is not XML ({e}): {text[:80]!r}") from None
    if root.tag not in ("ok", "error"):
        raise BeepError(f"{what}: piggybacked reply is <{root.tag}>, expected <ok /> or <error>")
    return root


def check_ok_element(ok: ET.Element, what: str):
    if ok.tag != "ok" or ok.attrib or len(ok) or (ok.text or "").strip():
        raise BeepError(f"{what}: expected a bare <ok />, got {ET.tostring(ok)[:80]!r}")


def error_code(root: ET.Element, what: str) -> tuple[int, str]:
    code = root.get("code", "")
    if root.tag != "error" or len(code) != 3 or not code.isdigit():
        raise BeepError(f"{what}: not an <error code='xyz'>: {ET.tostring(root)[:80]!r}")
    return int(code), " ".join((root.text or "").split())


@dataclass
class ApexMessage:
    """A parsed APEX message: its control document and any other MIME parts by Content-ID."""
    root: ET.Element
    parts: dict


def parse_apex(payload: bytes, what: str) -> ApexMessage:
    """RFC 3340 §4.1: application/beep+xml, or multipart/related whose start part is that."""
    headers, body = split_mime(payload)
    ctype = headers.get("content-type", "application/octet-stream")
    base = ctype.split(";")[0].strip().lower()
    if base == XML_CT:
        try:
            return ApexMessage(ET.fromstring(body), {})
        except ET.ParseError as e:
            raise BeepError(f"{what}: bad XML ({e}): {body[:80]!r}") from None
    if base != "multipart/related":
        raise BeepError(f"{what}: Content-Type {ctype!r} is neither {XML_CT} nor multipart/related")
    msg = BytesParser(policy=email_policy.compat32).parsebytes(payload)
    subparts = msg.get_payload()
    if not isinstance(subparts, list) or not subparts:
        raise BeepError(f"{what}: multipart/related without parts")
    start = msg.get_param("start")
    parts, control = {}, None
    for part in subparts:
        cid = (part.get("Content-ID") or "").strip()
        content = part.get_payload(decode=True) or b""
        if cid:
            parts[cid.strip("<>")] = content
        if control is None and (cid == start if start else True):
            control = (part, content)
    if control is None:
        raise BeepError(f"{what}: no part has the start Content-ID {start!r}")
    if control[0].get_content_type() != XML_CT:
        raise BeepError(f"{what}: start part is {control[0].get_content_type()}, not {XML_CT}")
    try:
        return ApexMessage(ET.fromstring(control[1]), parts)
    except ET.ParseError as e:
        raise BeepError(f"{what}: bad XML in the start part ({e})") from None


def data_content_text(msg: ApexMessage) -> str:
    """The text of the content a data element references (#fragment or cid:)."""
    ref = msg.root.get("content", "")
    if ref.startswith("#"):
        for dc in msg.root.findall("data-content"):
            if dc.get("Name") == ref[1:]:
                return "".join(dc.itertext())
        raise BeepError(f"data references {ref!r} but has no <data-content Name='{ref[1:]}'>")
    if ref.startswith("cid:"):
        part = msg.parts.get(ref[4:])
        if part is None:
            raise BeepError(f"data references {ref!r} but no MIME part has that Content-ID")
        return part.decode("utf-8", "replace")
    raise BeepError(f"data content reference {ref!r} is neither #fragment nor cid:")


# --------------------------------------------------------------------------- BEEP session with relay MSGs


class ApexChannel(Channel):
    def __init__(self, number: int):
        super().__init__(number)
        self.msg_asm = None              # (msgno, bytearray) of a relay MSG in progress
        self.unanswered = set()          # relay msgnos we have not replied to yet
        self.next_msgno = 0              # our next MSG number on this channel
        self.attachments = {}            # live transID -> endpoint attached on this channel


@dataclass
class Incoming:
    channel: int
    msgno: int
    payload: bytes


class ApexSession(Session):
    """beep_client.Session that also accepts MSGs from the relay (the relay is the BEEP client
    for deliveries, status reports and terminate, RFC 3340 §2.1) and waits through a Hub so
    that several sessions of one process make progress together."""

    def __init__(self, sock, hub, label: str):
        super().__init__(sock, hub.deadline)
        self.hub, self.label = hub, label
        self.channels[0] = ApexChannel(0)
        self.channels[0].pending.append(0)
        self.inbox = collections.deque()

    def _track_reply(self, ch, f):
        where = f"{self.label}: {f.kind} {f.channel} {f.msgno}"
        if ch.msg_asm is not None and f.kind != "MSG":
            raise BeepError(f"{where}: frame of another message inside an unfinished MSG (P7/P9)")
        if f.kind != "MSG":
            return super()._track_reply(ch, f)
        if ch.last_more == "*" and f.msgno != ch.last_msgno:
            raise BeepError(f"{where}: previous frame {ch.last_msgno} was '*' (P9)")
        ch.last_more, ch.last_msgno = f.more, f.msgno
        if ch.number == 0:
            raise BeepError(f"{where}: unexpected channel-0 MSG from the relay: {f.payload[:120]!r}")
        if ch.msg_asm is None:
            if f.msgno in ch.unanswered:
                raise BeepError(f"{where}: msgno reused while still awaiting our reply")
            ch.msg_asm = (f.msgno, bytearray())
        ch.msg_asm[1].extend(f.payload)
        if f.more == ".":
            ch.unanswered.add(f.msgno)
            self.inbox.append(Incoming(ch.number, f.msgno, bytes(ch.msg_asm[1])))
            ch.msg_asm = None

    def wait_reply(self, channel: int, msgno: int, what: str) -> Reply:
        def found():
            for r in self.completed:
                if (r.channel, r.msgno) == (channel, msgno):
                    return r
            return None
        r = self.hub.wait(found, f"{self.label}: {what}")
        self.completed.remove(r)
        return r


class Hub:
    """Drives every endpoint of the process; all waits go through wait()."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port = host, port
        self.deadline = time.monotonic() + timeout
        self.endpoints = []
        self.problems = []

    def connect(self, label: str) -> "Endpoint":
        left = self.deadline - time.monotonic()
        sock = socket.create_connection((self.host, self.port), timeout=max(left, 0.1))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ep = Endpoint(self, ApexSession(sock, self, label), label)
        self.endpoints.append(ep)
        return ep

    def close_all(self):
        for ep in self.endpoints:
            try:
                ep.session.sock.close()
            except OSError:
                pass
        self.endpoints = []

    def wait(self, cond, what: str):
        """Processes incoming frames one at a time (so that a reply is seen before any frame that
        follows it, e.g. a SEQ on a channel that reply created), answering relay MSGs, until
        cond() returns something true."""
        while True:
            progressed = True
            while progressed:
                progressed = False
                if self.problems:
                    raise BeepError("; ".join(self.problems))
                value = cond()
                if value:
                    return value
                for ep in self.endpoints:
                    if ep.live and ep.step():
                        progressed = True
                        break
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BeepError(f"scenario timeout while waiting for {what}")
            live = {ep.session.sock: ep for ep in self.endpoints if ep.live}
            for sock in select.select(list(live), [], [], min(left, 0.5))[0]:
                live[sock].read_available()


@dataclass
class Delivery:
    channel: int
    msgno: int
    payload: bytes
    msg: ApexMessage

    @property
    def originator(self) -> str:
        o = self.msg.root.find("originator")
        return "" if o is None else o.get("identity", "")

    @property
    def recipients(self) -> list:
        return [r.get("identity", "") for r in self.msg.root.findall("recipient")]


class Endpoint:
    """One BEEP session to the relay, with zero or more attachments on its APEX channels."""

    def __init__(self, hub: Hub, session: ApexSession, label: str):
        self.hub, self.session, self.label = hub, session, label
        self.live = True
        self.received = []           # Delivery, in arrival order
        self.terminated = []         # (channel, transID, code, text) of relay terminates
        self.next_channel = 1

    # ---- input
    def step(self) -> bool:
        """Processes one buffered frame, if any, and answers completed relay MSGs."""
        try:
            f = self.session.parser.next_frame()
            if f is None:
                return False
            self.session._process(f)
        except BeepError as e:
            raise BeepError(f"{self.label}: {e}") from None
        self.service()
        return True

    def read_available(self):
        s = self.session
        s.sock.settimeout(max(s.deadline - time.monotonic(), 0.001))
        try:
            data = s.sock.recv(65536)
        except ConnectionResetError:
            raise BeepError(f"{self.label}: connection reset by the relay") from None
        if not data:
            raise BeepError(f"{self.label}: the relay closed the connection unexpectedly")
        s.parser.feed(data)

    # ---- answering the relay (RFC 3340 §4.4.4.2, §4.4.3)
    def service(self):
        s = self.session
        while s.inbox:
            m = s.inbox.popleft()
            ch = s.channels[m.channel]
            kind, payload = self._answer(ch, m)
            ch.unanswered.discard(m.msgno)
            s.send_message(m.channel, kind, m.msgno, payload)

    def _problem(self, text: str):
        self.hub.problems.append(f"{self.label}: {text}")

    def _answer(self, ch: ApexChannel, m: Incoming) -> tuple[str, bytes]:
        what = f"relay MSG {m.channel} {m.msgno}"
        try:
            msg = parse_apex(m.payload, what)
        except BeepError as e:
            self._problem(str(e))
            return "ERR", error_payload(500, "cannot parse the message")
        root = msg.root
        if root.tag == "data":
            d = Delivery(m.channel, m.msgno, m.payload, msg)
            if len(root.findall("originator")) != 1 or not d.recipients:
                self._problem(f"{what}: data needs one originator and recipients (APEX-21): "
                              f"{m.payload[:200]!r}")
                return "ERR", error_payload(501, "data without originator or recipient")
            mine = set(ch.attachments.values())
            if not mine.intersection(d.recipients):
                self._problem(f"{what}: data for {d.recipients} delivered on a channel attached "
                              f"as {sorted(mine)} (APEX-25)")
                return "ERR", error_payload(550, "not attached as any recipient of this data")
            self.received.append(d)
            return "RPY", OK_PAYLOAD
        if root.tag == "terminate":
            try:
                tid = int(root.get("transID", "0"))
            except ValueError:
                self._problem(f"{what}: terminate with bad transID {root.get('transID')!r}")
                return "ERR", error_payload(501, "bad transID")
            self.terminated.append((m.channel, tid, root.get("code", "250"),
                                    " ".join((root.text or "").split())))
            if tid == 0:
                for c in self.session.channels.values():
                    if isinstance(c, ApexChannel):
                        c.attachments.clear()
                return "RPY", OK_PAYLOAD
            if tid in ch.attachments:
                del ch.attachments[tid]
                return "RPY", OK_PAYLOAD
            self._problem(f"{what}: relay terminated unknown transID {tid}")
            return "ERR", error_payload(550, "unknown transaction-identifier")
        self._problem(f"{what}: unexpected <{root.tag}> from the relay")
        return "ERR", error_payload(501, f"unexpected {root.tag}")

    # ---- our side
    def greet(self) -> list:
        return self.session.greet()

    def open_apex(self, endpoint: str, trans_id: int = 1) -> tuple[int, ET.Element]:
        """Starts an APEX channel with a piggybacked attach; returns (channel, <ok>/<error>)."""
        number = self.next_channel
        self.next_channel += 2
        what = f"{self.label}: start of channel {number} with attach {endpoint}"
        r = self.session.request0(start_attach_body(number, endpoint, trans_id), what)
        if r.kind == "ERR":
            code, text = parse_error(r, what)
            raise BeepError(f"{what}: relay refused the channel itself with ERR {code} {text!r}; "
                            f"piggybacking (RFC 3080 §2.3.1.2, RFC 3340 §4.2) creates the channel "
                            f"and puts the attach's answer in the profile element of the RPY")
        profile = expect_rpy(r, "profile", what)
        if profile.get("uri") != APEX:
            raise BeepError(f"{what}: relay chose profile {profile.get('uri')!r}")
        ch = ApexChannel(number)
        self.session.channels[number] = ch
        answer = parse_piggyback(profile, what)
        if answer.tag == "ok":
            check_ok_element(answer, what)
            ch.attachments[trans_id] = endpoint
        return number, answer

    def attach(self, endpoint: str) -> int:
        number, answer = self.open_apex(endpoint)
        if answer.tag != "ok":
            code, text = error_code(answer, "piggybacked attach")
            raise BeepError(f"{self.label}: attach {endpoint} refused: {code} {text!r}")
        return number

    def request(self, channel: int, payload: bytes, what: str) -> Reply:
        ch = self.session.channels[channel]
        msgno = ch.next_msgno
        ch.next_msgno += 1
        self.session.send_message(channel, "MSG", msgno, payload)
        return self.session.wait_reply(channel, msgno, what)

    def expect_ok(self, reply: Reply, what: str):
        ok = expect_rpy(reply, "ok", f"{self.label}: {what}")
        check_ok_element(ok, f"{self.label}: {what}")

    def expect_err(self, reply: Reply, code: int, what: str) -> str:
        where = f"{self.label}: {what}"
        if reply.kind != "ERR":
            body = reply.payload.split(b"\r\n\r\n", 1)[-1][:80]
            raise BeepError(f"{where}: relay answered {reply.kind} {body!r}, expected ERR {code}")
        got, text = parse_error(reply, where)
        if got != code:
            raise BeepError(f"{where}: relay answered ERR {got} {text!r}, expected {code}")
        return text

    def attach_msg(self, channel: int, endpoint: str, trans_id: int) -> Reply:
        reply = self.request(channel, xml_payload(attach_doc(endpoint, trans_id)),
                             f"attach {endpoint} transID {trans_id}")
        if reply.kind == "RPY":
            self.session.channels[channel].attachments[trans_id] = endpoint
        return reply

    def terminate(self, channel: int, trans_id: int) -> Reply:
        reply = self.request(channel, xml_payload(terminate_doc(trans_id)),
                             f"terminate transID {trans_id}")
        if reply.kind == "RPY":
            atts = self.session.channels[channel].attachments
            if trans_id == 0:
                atts.clear()
            atts.pop(trans_id, None)
        return reply

    def wait_deliveries(self, n: int, what: str) -> list:
        self.hub.wait(lambda: len(self.received) >= n, f"{self.label}: {what}")
        return self.received

    def detach_and_leave(self, channel: int, trans_id: int = 1):
        """terminate the attachment, close its channel, release the session (RFC 3340 §4.4.3)."""
        self.expect_ok(self.terminate(channel, trans_id), f"terminate transID {trans_id}")
        self.leave(channel)

    def leave(self, *channels):
        for c in channels:
            self.session.close_channel(c)
        self.session.release()
        self.live = False
        self.session.sock.close()


# --------------------------------------------------------------------------- scenarios

def sc_attach_send_receive(hub: Hub, args) -> str:
    d = args.domain
    alice_id, bob_id = f"alice@{d}", f"bob@{d}"
    bob = hub.connect("bob")
    bob.greet()
    bob_ch = bob.attach(bob_id)
    alice = hub.connect("alice")
    alice.greet()
    alice_ch = alice.attach(alice_id)
    sent = xml_payload(data_doc(alice_id, bob_id, "hello, bob"))
    reply = alice.request(alice_ch, sent, "data to bob")
    alice.expect_ok(reply, "data to bob (APEX-23: ok = accepted)")
    got = bob.wait_deliveries(1, "delivery of alice's data")[0]
    if got.payload != sent:
        raise BeepError(f"APEX-28: delivered payload differs from what alice sent:\n"
                        f"  sent:     {sent!r}\n  received: {got.payload!r}")
    if got.channel != bob_ch:
        raise BeepError(f"delivered on channel {got.channel}, bob attached on {bob_ch}")
    alice.detach_and_leave(alice_ch)
    bob.detach_and_leave(bob_ch)
    extra = [len(bob.received) - 1, len(alice.received)]
    if any(extra):
        raise BeepError(f"unexpected extra deliveries (bob {extra[0]}, alice {extra[1]})")
    return (f"{alice_id} -> {bob_id}: RPY <ok />, {len(sent)}-octet payload delivered "
            f"byte-identical on bob's channel {bob_ch}; both detached, closed and released")


def sc_errors(hub: Hub, args) -> str:
    d = args.domain
    carol_id = f"carol@{d}"
    carol = hub.connect("carol")
    carol.greet()
    ch = carol.attach(carol_id)
    notes = []
    # (a) APEX-10: attach reusing the live transID 1 on the same channel.
    r = carol.attach_msg(ch, f"carol/appl=wb@{d}", 1)
    notes.append(f"555 {carol.expect_err(r, 555, 'attach with live transID 1 (APEX-10)')!r}")
    # (b) APEX-22: data in the name of an endpoint we did not attach as.
    forged = xml_payload(data_doc(f"mallory@{d}", f"nobody@{d}", "forged"))
    r = carol.request(ch, forged, "data from mallory")
    notes.append(f"537 {carol.expect_err(r, 537, 'data with foreign originator (APEX-22)')!r}")
    # (c) APEX-14: the same endpoint from another application -> piggybacked 554.
    other = hub.connect("carol-2")
    other.greet()
    och, answer = other.open_apex(carol_id)
    if answer.tag != "error":
        raise BeepError(f"second attach of {carol_id} answered <{answer.tag}>, expected error 554 "
                        f"(APEX-14)")
    code, text = error_code(answer, "second attach")
    if code != 554:
        raise BeepError(f"second attach of {carol_id}: error {code} {text!r}, expected 554 (APEX-14)")
    notes.append(f"554 {text!r} (piggybacked)")
    other.leave(och)
    # (d) APEX-11: endpoint outside the relay's domains.
    r = carol.attach_msg(ch, "x@not-this-domain.example", 2)
    notes.append(f"553 {carol.expect_err(r, 553, 'attach outside the domain (APEX-11)')!r}")
    # (e) APEX-19: terminate with an unknown transID.
    r = carol.terminate(ch, 42)
    notes.append(f"550 {carol.expect_err(r, 550, 'terminate transID 42 (APEX-19)')!r}")
    carol.detach_and_leave(ch)
    if carol.received or other.received:
        raise BeepError("unexpected deliveries to carol")
    return "; ".join(notes) + "; carol detached, closed and released"


def sc_status(hub: Hub, args) -> str:
    d = args.domain
    dave_id, nobody = f"dave@{d}", f"nobody@{d}"
    dave = hub.connect("dave")
    dave.greet()
    ch = dave.attach(dave_id)
    option = "<option internal='statusRequest' transID='86' />"
    sent = xml_payload(data_doc(dave_id, nobody, "hello, nobody", option))
    dave.expect_ok(dave.request(ch, sent, "data with statusRequest"),
                   "data with statusRequest (ok = accepted even if undeliverable)")
    rep = dave.wait_deliveries(1, "the status report")[0]
    root = rep.msg.root
    if rep.originator != f"apex=report@{d}":
        raise BeepError(f"APEX-38: report originator is {rep.originator!r}, expected apex=report@{d}")
    if rep.recipients != [dave_id]:
        raise BeepError(f"APEX-38: report recipients {rep.recipients}, expected [{dave_id!r}]")
    for opt in root.iter("option"):
        if opt.get("internal") == "statusRequest":
            raise BeepError("APEX-39: a statusResponse carries a statusRequest option")
    ref = root.get("content", "")
    dcs = [dc for dc in root.findall("data-content") if "#" + dc.get("Name", "") == ref]
    if not ref.startswith("#") or len(dcs) != 1:
        raise BeepError(f"report content {ref!r} does not reference one data-content: "
                        f"{rep.payload[:300]!r}")
    srs = list(dcs[0])
    if len(srs) != 1 or srs[0].tag != "statusResponse":
        raise BeepError(f"report data-content does not hold one statusResponse: {rep.payload!r}")
    sr = srs[0]
    if sr.get("transID") != "86":
        raise BeepError(f"statusResponse transID {sr.get('transID')!r}, expected '86'")
    dests = sr.findall("destination")
    if len(dests) != 1 or dests[0].get("identity") != nobody:
        raise BeepError(f"statusResponse destinations "
                        f"{[x.get('identity') for x in dests]}, expected [{nobody!r}]")
    replies = dests[0].findall("reply")
    if len(replies) != 1:
        raise BeepError(f"destination holds {len(replies)} reply elements, expected exactly one")
    code, tid = replies[0].get("code"), replies[0].get("transID")
    if code != "550":
        raise BeepError(f"reply code {code!r} for unattached {nobody}, expected '550'")
    if tid is not None and tid != "86":
        raise BeepError(f"reply transID {tid!r}, expected '86' (or absent)")
    dave.detach_and_leave(ch)
    text = " ".join((replies[0].text or "").split())
    return (f"statusResponse transID=86 from apex=report@{d}: destination {nobody} reply "
            f"code=550 transID={tid} {text!r}; answered ok")


def sc_send(hub: Hub, args) -> str:
    ep = hub.connect("sender")
    ep.greet()
    ch = ep.attach(args.sender)
    ep.expect_ok(ep.request(ch, xml_payload(data_doc(args.sender, args.to, args.text)),
                            f"data to {args.to}"), f"data to {args.to}")
    ep.detach_and_leave(ch)
    return f"{args.sender} -> {args.to}: RPY <ok />"


def sc_receive(hub: Hub, args) -> str:
    ep = hub.connect("receiver")
    ep.greet()
    ch = ep.attach(args.name)
    print(f"attached {args.name}", flush=True)
    for i in range(args.count):
        d = ep.wait_deliveries(i + 1, f"data {i + 1} of {args.count}")[i]
        text = data_content_text(d.msg).replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
        print(f"received from={d.originator} text={text}", flush=True)
    ep.detach_and_leave(ch)
    return f"{args.count} data received by {args.name}"


SCENARIOS = {
    "attach-send-receive": (sc_attach_send_receive, ("domain",)),
    "errors": (sc_errors, ("domain",)),
    "status": (sc_status, ("domain",)),
    "send": (sc_send, ("sender", "to", "text")),
    "receive": (sc_receive, ("name",)),
}


# --------------------------------------------------------------------------- self-test

EX_START = (b"MSG 0 1 . 52 199\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n"
            b"   <profile uri='http://iana.org/beep/APEX'>\r\n"
            b"      <![CDATA[<attach endpoint='fred@example.com' transID='1' />]]>\r\n"
            b"   </profile>\r\n</start>\r\nEND\r\n")
EX_START_OK = (b"RPY 0 1 . 217 109\r\nContent-Type: application/beep+xml\r\n\r\n"
               b"<profile uri='http://iana.org/beep/APEX'><![CDATA[<ok />]]></profile>\r\nEND\r\n")
EX_DATA = (b"MSG 1 0 . 0 231\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n"
           b"   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n"
           b"   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n")
EX_OK = b"RPY 1 0 . 0 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"
EX_STATUS = (b"MSG 1 0 . 0 302\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n"
             b"   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com'>\r\n"
             b"      <option internal='statusRequest' transID='86' />\r\n   </recipient>\r\n"
             b"   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n")
EX_REPORT = (b"MSG 1 0 . 46 416\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n"
             b"   <originator identity='apex=report@example.com' />\r\n"
             b"   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n"
             b"      <statusResponse transID='86'>\r\n"
             b"         <destination identity='barney@example.com'>\r\n"
             b"            <reply code='250' transID='86' />\r\n         </destination>\r\n"
             b"      </statusResponse>\r\n   </data-content>\r\n</data>\r\nEND\r\n")
EX_TERMINATE0 = (b"MSG 1 2 . 329 65\r\nContent-Type: application/beep+xml\r\n\r\n"
                 b"<terminate transID='0' />\r\nEND\r\n")
EX_MIME = (b"Content-Type: multipart/related; boundary=\"XX\"; start=\"<1@fred.example.com>\"; "
           b"type=\"application/beep+xml\"\r\n\r\n--XX\r\nContent-Type: application/beep+xml\r\n"
           b"Content-ID: <1@fred.example.com>\r\n\r\n<data content='cid:2@fred.example.com'>\r\n"
           b"   <originator identity='fred@example.com' />\r\n"
           b"   <recipient identity='barney@example.com' />\r\n</data>\r\n--XX\r\n"
           b"Content-Type: text/plain\r\nContent-ID: <2@fred.example.com>\r\n\r\nhello, barney\r\n--XX--\r\n")


class _FakeSock:
    def __init__(self):
        self.out = bytearray()

    def settimeout(self, _t):
        pass

    def sendall(self, data):
        self.out += data


def selftest() -> int:
    def frame(raw: bytes) -> Frame:
        p = FrameParser()
        p.feed(raw)
        f = p.next_frame()
        assert f is not None and not p.buf, raw
        return f

    checks = 0
    # builders reproduce the byte-exact EX_* frames above
    assert encode(Frame("MSG", 0, 1, ".", 52, mime(XML_CT, start_attach_body(
        1, "fred@example.com", 1)))) == EX_START
    assert encode(Frame("MSG", 1, 0, ".", 0, xml_payload(data_doc(
        "fred@example.com", "barney@example.com", "hello, barney")))) == EX_DATA
    assert encode(Frame("MSG", 1, 0, ".", 0, xml_payload(data_doc(
        "fred@example.com", "barney@example.com", "hello, barney",
        "<option internal='statusRequest' transID='86' />")))) == EX_STATUS
    assert encode(Frame("MSG", 1, 2, ".", 329, xml_payload(terminate_doc(0)))) == EX_TERMINATE0
    assert encode(Frame("RPY", 1, 0, ".", 0, OK_PAYLOAD)) == EX_OK
    checks += 5
    # piggybacked reply in its three forms
    for prof in (frame(EX_START_OK).payload.split(b"\r\n\r\n", 1)[1].decode(),
                 f"<profile uri='{APEX}'>&lt;ok /&gt;</profile>",
                 f"<profile uri='{APEX}' encoding='base64'>"
                 f"{base64.b64encode(b'<ok />').decode()}</profile>"):
        check_ok_element(parse_piggyback(ET.fromstring(prof), "t"), "t")
        checks += 1
    err = parse_piggyback(ET.fromstring(
        f"<profile uri='{APEX}'><![CDATA[<error code='554'>already attached</error>]]></profile>"), "t")
    assert error_code(err, "t") == (554, "already attached")
    # message parsing: inline content, MIME part, report
    assert data_content_text(parse_apex(frame(EX_DATA).payload, "t")) == "hello, barney"
    mm = parse_apex(EX_MIME, "t")
    assert mm.root.tag == "data" and data_content_text(mm) == "hello, barney", mm.parts
    checks += 3
    # an endpoint answers relay MSGs: delivery, report, foreign recipient, terminate
    hub = Hub("127.0.0.1", 0, 5)
    s = ApexSession(_FakeSock(), hub, "fred")
    s.quiet = True
    ep = Endpoint(hub, s, "fred")
    s.channels[1] = ApexChannel(1)
    s.channels[1].attachments[1] = "fred@example.com"
    s.channels[1].in_seq = 46          # the relay's earlier RPY <ok /> to fred's data (46 octets)
    s._process(frame(EX_REPORT))
    ep.service()
    assert bytes(s.sock.out) == encode(Frame("RPY", 1, 0, ".", 0, OK_PAYLOAD)), s.sock.out
    assert ep.received[0].originator == "apex=report@example.com" and not hub.problems
    s.sock.out.clear()
    s._process(Frame("MSG", 1, 1, ".", s.channels[1].in_seq, EX_DATA.split(b"\r\n", 1)[1][:-5]))
    ep.service()
    assert bytes(s.sock.out).startswith(b"ERR 1 1 . 46 ") and b"code='550'" in s.sock.out
    assert hub.problems and len(ep.received) == 1
    hub.problems.clear()
    s.sock.out.clear()
    s._process(Frame("MSG", 1, 2, ".", s.channels[1].in_seq, xml_payload("<terminate transID='1' code='421'>"
                                                         "relay going down</terminate>")))
    ep.service()
    assert bytes(s.sock.out).startswith(b"RPY 1 2 . ") and not s.channels[1].attachments
    assert ep.terminated == [(1, 1, "421", "relay going down")]
    checks += 3
    print(f"OK: selftest {checks} checks passed")
    return 0


# --------------------------------------------------------------------------- main

class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"FAIL: usage: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv=None) -> int:
    ap = _ArgParser(description="Independent APEX endpoint for apexd interop tests")
    ap.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--timeout", type=float, default=20.0, help="whole-scenario timeout (s)")
    ap.add_argument("--domain", help="administrative domain of the relay")
    ap.add_argument("--from", dest="sender", help="send: originator endpoint")
    ap.add_argument("--to", help="send: recipient endpoint")
    ap.add_argument("--text", default="hi", help="send: data-content text")
    ap.add_argument("--name", help="receive: endpoint to attach as")
    ap.add_argument("--count", type=int, default=1, help="receive: number of data to wait for")
    ap.add_argument("--selftest", action="store_true", help="check the builders/parsers offline")
    args = ap.parse_args(argv)
    if args.selftest:
        try:
            return selftest()
        except (AssertionError, BeepError) as e:
            print(f"FAIL: selftest: {e!r}", file=sys.stderr)
            return 1
    if not args.scenario or not args.port:
        ap.error("SCENARIO and --port are required (or use --selftest)")
    func, needed = SCENARIOS[args.scenario]
    missing = [n for n in needed if not getattr(args, n)]
    if missing:
        ap.error(f"{args.scenario} needs {', '.join('--' + ('from' if n == 'sender' else n) for n in missing)}")
    if args.timeout <= 0 or args.count < 1:
        ap.error("--timeout and --count must be positive")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"FAIL: refusing to connect to non-loopback host {args.host}", file=sys.stderr)
        return 1
    hub = Hub(args.host, args.port, args.timeout)
    try:
        detail = func(hub, args)
    except BeepError as e:
        print(f"FAIL: {args.scenario}: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"FAIL: {args.scenario}: timeout: {e or 'socket operation timed out'}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"FAIL: {args.scenario}: socket error: {e}", file=sys.stderr)
        return 1
    finally:
        hub.close_all()
    print(f"OK: {args.scenario} {detail}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
