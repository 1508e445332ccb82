#!/usr/bin/env python3
"""Independent BEEP initiator (RFC 3080 core + RFC 3081 TCP mapping).

This is a stand-alone interoperability test peer for the apexd BEEP/APEX relay.
It was written from the RFC text, not from the server's source, so that the two
implementations check each other.

It frames with the size field (never by scanning for END), verifies every
incoming seqno, honours the peer's SEQ windows strictly (initial window 4096
on every channel, channel 0 included), answers with its own SEQ frames and
checks the BEEP reply-ordering rule.  Standard library only (Python 3.11).

Usage:
    beep_client.py --host 127.0.0.1 --port PORT SCENARIO [--bytes N] [--timeout S]
    beep_client.py --selftest
Scenarios: greet-start-close, even-channel, unknown-profile, stream, malformed,
byte-at-a-time.  Exit status 0 on success ("OK: ..." on stdout), 1 on failure
("FAIL: <reason>" on stderr).
"""
import argparse
import collections
import ipaddress
import re
import select
import socket
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

APEX = "http://iana.org/beep/APEX"
NOPE = "http://example.org/beep/NOPE"
XML_CT = "application/beep+xml"
DATA_KINDS = ("MSG", "RPY", "ERR", "ANS", "NUL")
MOD = 1 << 32
MAX31 = (1 << 31) - 1
MAX32 = MOD - 1
MAX_HEADER = 128            # bound for a header line, CRLF included
INITIAL_WINDOW = 4096       # RFC 3081 §3.1.1
RECV_BUFFER = 65536         # what we advertise once we consume data
MAX_FRAME_PAYLOAD = 4096    # our own segmentation limit
STREAM_MSG_SIZE = 8192
MAX_UNREPLIED = 64
STALL_SECS = 5.0
_NUM = re.compile(rb"[0-9]+")


class BeepError(Exception):
    """A protocol violation or failed expectation; the text is the FAIL reason."""


# --------------------------------------------------------------------------- frames

@dataclass
class Frame:
    kind: str                 # MSG RPY ERR ANS NUL or SEQ
    channel: int
    msgno: int = 0
    more: str = "."
    seqno: int = 0
    payload: bytes = b""
    ansno: int | None = None  # ANS only
    ackno: int = 0            # SEQ only
    window: int = 0           # SEQ only


def encode(f: Frame) -> bytes:
    if f.kind == "SEQ":
        return b"SEQ %d %d %d\r\n" % (f.channel, f.ackno, f.window)
    hdr = b"%s %d %d %s %d %d" % (f.kind.encode(), f.channel, f.msgno, f.more.encode(),
                                  f.seqno, len(f.payload))
    if f.kind == "ANS":
        hdr += b" %d" % f.ansno
    return hdr + b"\r\n" + f.payload + b"END\r\n"


def _num(tok: bytes, limit: int, name: str) -> int:
    if not _NUM.fullmatch(tok) or int(tok) > limit:
        raise BeepError(f"poorly formed frame header: bad {name} {tok!r}")
    return int(tok)


def parse_header(line: bytes) -> tuple[Frame, int]:
    """Parse a header line (without CRLF); returns the frame and its payload size."""
    parts = line.split(b" ")
    kw = parts[0].decode("ascii", "replace")
    if kw == "SEQ":
        if len(parts) != 4:
            raise BeepError(f"poorly formed SEQ frame {line!r}")
        return Frame("SEQ", _num(parts[1], MAX31, "channel"), ackno=_num(parts[2], MAX32, "ackno"),
                     window=_num(parts[3], MAX31, "window")), 0
    if kw not in DATA_KINDS:
        raise BeepError(f"poorly formed frame header (keyword) {line[:40]!r}")
    if len(parts) != (7 if kw == "ANS" else 6):
        raise BeepError(f"poorly formed {kw} header (field count) {line!r}")
    if parts[3] not in (b".", b"*"):
        raise BeepError(f"poorly formed {kw} header (more indicator) {line!r}")
    f = Frame(kw, _num(parts[1], MAX31, "channel"), _num(parts[2], MAX31, "msgno"),
              parts[3].decode(), _num(parts[4], MAX32, "seqno"))
    size = _num(parts[5], MAX31, "size")
    if kw == "ANS":
        f.ansno = _num(parts[6], MAX32, "ansno")
    if kw == "NUL" and (f.more != "." or size != 0):
        raise BeepError(f"NUL frame must be '.' with size 0: {line!r}")
    return f, size


class FrameParser:
    """Incremental frame parser: feed() bytes, next_frame() returns a Frame or None."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes):
        self.buf += data

    def next_frame(self) -> Frame | None:
        end = self.buf.find(b"\r\n", 0, MAX_HEADER)
        if end < 0:
            if len(self.buf) >= MAX_HEADER:
                raise BeepError(f"frame header line longer than {MAX_HEADER} octets")
            return None
        frame, size = parse_header(bytes(self.buf[:end]))
        start = end + 2
        if frame.kind == "SEQ":
            del self.buf[:start]
            return frame
        total = start + size + 5
        if len(self.buf) < total:
            return None
        trailer = bytes(self.buf[start + size:total])
        if trailer != b"END\r\n":
            raise BeepError(f"bad frame trailer {trailer!r} after {size}-octet payload")
        frame.payload = bytes(self.buf[start:start + size])
        del self.buf[:total]
        return frame


# --------------------------------------------------------------------------- messages

def mime(content_type: str, body: str) -> bytes:
    return f"Content-Type: {content_type}\r\n\r\n{body}".encode()


def split_mime(payload: bytes) -> tuple[dict, bytes]:
    if payload.startswith(b"\r\n"):
        return {}, payload[2:]
    idx = payload.find(b"\r\n\r\n")
    if idx < 0:
        raise BeepError(f"message without MIME header/body separator: {payload[:60]!r}")
    headers = {}
    for line in payload[:idx].split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            raise BeepError(f"bad MIME header line {line!r}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers, payload[idx + 4:]


def xml_root(payload: bytes, what: str) -> ET.Element:
    headers, body = split_mime(payload)
    ctype = headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype != XML_CT:
        raise BeepError(f"{what}: Content-Type is {ctype!r}, expected {XML_CT}")
    try:
        return ET.fromstring(body)
    except ET.ParseError as e:
        raise BeepError(f"{what}: bad XML ({e}): {body[:80]!r}") from None


def greeting_body() -> str:
    return "<greeting />\r\n"


def start_body(number: int, uris: list[str]) -> str:
    profiles = "".join(f"   <profile uri='{u}' />\r\n" for u in uris)
    return f"<start number='{number}'>\r\n{profiles}</start>\r\n"


def close_body(number: int) -> str:
    return f"<close number='{number}' code='200' />\r\n" if number else "<close code='200' />\r\n"


@dataclass
class Reply:
    kind: str          # RPY, ERR or NUL (end of a one-to-many reply)
    channel: int
    msgno: int
    payload: bytes = b""
    answers: list = field(default_factory=list)


def parse_error(reply: Reply, what: str) -> tuple[int, str]:
    root = xml_root(reply.payload, what)
    code = root.get("code", "")
    if root.tag != "error" or not re.fullmatch(r"[1-5][0-9][0-9]", code):
        raise BeepError(f"{what}: ERR without a valid <error code=...>: {reply.payload[-80:]!r}")
    return int(code), " ".join((root.text or "").split())


def expect_rpy(reply: Reply, tag: str, what: str) -> ET.Element:
    if reply.kind == "ERR":
        code, text = parse_error(reply, what)
        raise BeepError(f"{what}: server answered ERR {code} {text!r}")
    if reply.kind != "RPY":
        raise BeepError(f"{what}: expected RPY, got {reply.kind}")
    root = xml_root(reply.payload, what)
    if root.tag != tag:
        raise BeepError(f"{what}: expected <{tag}>, got <{root.tag}>")
    return root


# --------------------------------------------------------------------------- session

class Channel:
    def __init__(self, number: int):
        self.number = number
        self.in_seq = 0                      # next expected incoming seqno
        self.out_seq = 0                     # next outgoing seqno
        self.peer_right = INITIAL_WINDOW     # peer window right edge (ackno + window)
        self.adv_right = INITIAL_WINDOW      # right edge of the window we advertised
        self.pending = collections.deque()   # our MSG msgnos awaiting a reply, in order
        self.asm = None                      # (kind, bytearray) of the reply in progress
        self.answers = {}                    # ansno -> bytearray (one-to-many in progress)
        self.done_answers = []
        self.last_more, self.last_msgno = ".", None

    def send_room(self) -> int:
        room = (self.peer_right - self.out_seq) % MOD
        return 0 if room > MAX31 else room


class Session:
    def __init__(self, sock: socket.socket, deadline: float, byte_mode: bool = False):
        self.sock, self.deadline, self.byte_mode = sock, deadline, byte_mode
        self.parser = FrameParser()
        self.channels = {0: Channel(0)}
        self.channels[0].pending.append(0)   # the greeting answers a virtual MSG 0
        self.next_msgno0 = 1
        self.completed = collections.deque()
        self.quiet = False                   # suppress our SEQ frames (release/abort)
        self.seq_frames = 0

    # ---- raw I/O
    def _left(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BeepError(f"scenario timeout exceeded while {what}")
        return left

    def send_raw(self, data: bytes):
        self.sock.settimeout(self._left("sending"))
        if not self.byte_mode:
            self.sock.sendall(data)
            return
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])
            time.sleep(0)

    def _recv(self, timeout: float, what: str) -> bool:
        t = min(timeout, self._left(f"waiting for {what}"))
        self.sock.settimeout(max(t, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"no data for {t:.1f}s while waiting for {what}") from None
        self.parser.feed(data)
        return bool(data)

    def read_frame(self, timeout: float, what: str) -> Frame | None:
        """Next frame (already validated and accounted for), or None on EOF."""
        end = time.monotonic() + timeout
        while True:
            f = self.parser.next_frame()
            if f is not None:
                self._process(f)
                return f
            if not self._recv(end - time.monotonic(), what):
                if self.parser.buf:
                    raise BeepError(f"connection closed mid-frame while waiting for {what}: "
                                    f"{bytes(self.parser.buf[:40])!r}")
                return None

    def poll(self):
        """Process every frame that can be read without blocking."""
        while True:
            f = self.parser.next_frame()
            if f is not None:
                self._process(f)
                continue
            if not select.select([self.sock], [], [], 0)[0]:
                return
            if not self._recv(1.0, "poll"):
                raise BeepError("server closed the connection unexpectedly")

    # ---- incoming frame bookkeeping
    def _process(self, f: Frame):
        ch = self.channels.get(f.channel)
        if ch is None:
            raise BeepError(f"{f.kind} frame for non-existent channel {f.channel}")
        if f.kind == "SEQ":
            self.seq_frames += 1
            if (ch.out_seq - f.ackno) % MOD > MAX31:
                raise BeepError(f"SEQ {f.channel} acks {f.ackno} but we only sent up to {ch.out_seq}")
            ch.peer_right = (f.ackno + f.window) % MOD
            return
        size = len(f.payload)
        if f.seqno != ch.in_seq:
            raise BeepError(f"{f.kind} on channel {f.channel}: seqno {f.seqno}, expected {ch.in_seq}")
        if (ch.adv_right - f.seqno - size) % MOD > MAX31:
            raise BeepError(f"{f.kind} on channel {f.channel} overruns our window "
                            f"(seqno {f.seqno} + {size} > {ch.adv_right})")
        ch.in_seq = (ch.in_seq + size) % MOD
        self._track_reply(ch, f)
        if not self.quiet and (ch.adv_right - ch.in_seq) % MOD < RECV_BUFFER // 2:
            ch.adv_right = (ch.in_seq + RECV_BUFFER) % MOD
            self.send_raw(encode(Frame("SEQ", ch.number, ackno=ch.in_seq, window=RECV_BUFFER)))

    def _track_reply(self, ch: Channel, f: Frame):
        where = f"{f.kind} {f.channel} {f.msgno}"
        if f.kind == "MSG":
            raise BeepError(f"unexpected MSG from server: {where}")
        if ch.last_more == "*" and f.msgno != ch.last_msgno:
            raise BeepError(f"{where}: previous frame {ch.last_msgno} was '*' (P9)")
        ch.last_more, ch.last_msgno = f.more, f.msgno
        if not ch.pending or f.msgno != ch.pending[0]:
            want = ch.pending[0] if ch.pending else "none outstanding"
            raise BeepError(f"{where}: reply out of order or to unknown MSG (expected {want})")
        if f.kind in ("RPY", "ERR"):
            if ch.asm is None:
                ch.asm = (f.kind, bytearray())
            elif ch.asm[0] != f.kind:
                raise BeepError(f"{where}: keyword changed within a message (P7)")
            ch.asm[1].extend(f.payload)
            if f.more == ".":
                self._complete(ch, Reply(f.kind, ch.number, f.msgno, bytes(ch.asm[1])))
        elif f.kind == "ANS":
            if ch.asm is not None and ch.asm[0] != "ANS":
                raise BeepError(f"{where}: ANS inside a {ch.asm[0]} reply (P7)")
            ch.asm = ("ANS", None)
            ch.answers.setdefault(f.ansno, bytearray()).extend(f.payload)
            if f.more == ".":
                ch.done_answers.append(bytes(ch.answers.pop(f.ansno)))
        else:  # NUL
            if (ch.asm is not None and ch.asm[0] != "ANS") or ch.answers:
                raise BeepError(f"{where}: NUL not after complete ANS messages (P8)")
            self._complete(ch, Reply("NUL", ch.number, f.msgno, b"", ch.done_answers))

    def _complete(self, ch: Channel, reply: Reply):
        ch.pending.popleft()
        ch.asm, ch.done_answers = None, []
        self.completed.append(reply)

    # ---- outgoing messages
    def send_piece(self, channel: int, kind: str, msgno: int, chunk: bytes, more: str):
        ch = self.channels[channel]
        if len(chunk) > ch.send_room():
            raise BeepError("internal error: frame would exceed the peer's window")
        self.send_raw(encode(Frame(kind, channel, msgno, more, ch.out_seq, chunk)))
        ch.out_seq = (ch.out_seq + len(chunk)) % MOD

    def send_message(self, channel: int, kind: str, msgno: int, payload: bytes):
        """Send a whole message, segmenting and waiting for SEQ as the window requires."""
        ch = self.channels[channel]
        if kind == "MSG":
            ch.pending.append(msgno)
        off = 0
        while True:
            n = min(len(payload) - off, ch.send_room(), MAX_FRAME_PAYLOAD)
            if n > 0 or off == len(payload):
                last = off + n == len(payload)
                self.send_piece(channel, kind, msgno, payload[off:off + n], "." if last else "*")
                off += n
                if last:
                    return
            elif self.read_frame(STALL_SECS, f"SEQ opening channel {channel}'s window") is None:
                raise BeepError(f"EOF while waiting for window on channel {channel}")

    def wait_reply(self, channel: int, msgno: int, what: str) -> Reply:
        while not self.completed:
            if self.read_frame(self._left(f"waiting for {what}"), what) is None:
                raise BeepError(f"server closed the connection while waiting for {what}")
        r = self.completed.popleft()
        if (r.channel, r.msgno) != (channel, msgno):
            raise BeepError(f"got reply {r.channel}/{r.msgno}, expected {what} ({channel}/{msgno})")
        return r

    def request0(self, body: str, what: str) -> Reply:
        msgno = self.next_msgno0
        self.next_msgno0 += 1
        self.send_message(0, "MSG", msgno, mime(XML_CT, body))
        return self.wait_reply(0, msgno, what)

    # ---- channel management
    def greet(self) -> list[str]:
        r = self.wait_reply(0, 0, "the server greeting")
        if r.kind == "ERR":
            code, text = parse_error(r, "greeting")
            raise BeepError(f"server refused the session (ERR 0 0): {code} {text!r}")
        root = expect_rpy(r, "greeting", "server greeting")
        uris = [p.get("uri", "") for p in root.findall("profile")]
        if APEX not in uris:
            raise BeepError(f"greeting does not offer {APEX}: {uris}")
        self.send_message(0, "RPY", 0, mime(XML_CT, greeting_body()))
        return uris

    def start(self, number: int, uris: list[str]) -> Reply:
        return self.request0(start_body(number, uris), f"reply to start of channel {number}")

    def start_apex(self, number: int):
        root = expect_rpy(self.start(number, [APEX]), "profile", f"start channel {number}")
        if root.get("uri") != APEX:
            raise BeepError(f"start channel {number}: server chose {root.get('uri')!r}")
        self.channels[number] = Channel(number)

    def close_channel(self, number: int):
        ok = expect_rpy(self.request0(close_body(number), f"close of channel {number}"), "ok",
                        f"close channel {number}")
        if ok.attrib or len(ok) or (ok.text or "").strip():
            raise BeepError("<ok> must have no attributes and no content")
        del self.channels[number]

    def release(self):
        self.quiet = True
        ok = expect_rpy(self.request0(close_body(0), "session release"), "ok", "session release")
        if ok.attrib or len(ok):
            raise BeepError("<ok> must have no attributes and no content")
        try:
            while (f := self.read_frame(STALL_SECS, "EOF after <ok />")) is not None:
                if f.kind != "SEQ":
                    raise BeepError(f"{f.kind} frame received after the release <ok />")
        except TimeoutError:
            raise BeepError("server did not close TCP after the release <ok />") from None
        except ConnectionResetError:
            raise BeepError("connection reset (not an orderly close) after <ok />") from None


# --------------------------------------------------------------------------- scenarios

def sc_greet_start_close(s: Session, args) -> str:
    uris = s.greet()
    s.start_apex(1)
    s.close_channel(1)
    s.release()
    return f"profiles={uris}; channel 1 started and closed; session released; EOF seen"


def sc_even_channel(s: Session, args) -> str:
    s.greet()
    r = s.start(2, [APEX])
    if r.kind != "ERR":
        raise BeepError(f"start of even channel 2 answered {r.kind}, expected ERR 5xx")
    code, text = parse_error(r, "start channel 2")
    if not 500 <= code <= 599:
        raise BeepError(f"even channel start refused with non-5xx code {code}")
    s.release()
    return f"start of channel 2 refused with {code} {text!r}; session released"


def sc_unknown_profile(s: Session, args) -> str:
    s.greet()
    r = s.start(1, [NOPE])
    if r.kind != "ERR":
        raise BeepError(f"start with unknown profile answered {r.kind}, expected ERR 550")
    code, text = parse_error(r, "start with unknown profile")
    if code != 550:
        raise BeepError(f"start with unknown profile refused with {code}, expected 550 ({text!r})")
    s.release()
    return f"start refused with {code} {text!r}; session released"


def sc_stream(s: Session, args) -> str:
    s.greet()
    s.start_apex(1)
    ch = s.channels[1]
    header = b"Content-Type: application/octet-stream\r\n\r\n"
    filler = (b"END\r\n" + bytes(range(256))) * (STREAM_MSG_SIZE // 256 + 1)
    body = header + filler[:STREAM_MSG_SIZE - len(header)]
    count = max(1, -(-args.bytes // STREAM_MSG_SIZE))
    kinds, codes = collections.Counter(), collections.Counter()
    next_msg, got, preempted, cur, off = 0, 0, 0, None, 0
    t0 = last_progress = time.monotonic()
    while got < count:
        progressed = False
        s.poll()
        while s.completed:
            r = s.completed.popleft()
            if (r.channel, r.msgno) != (1, got):
                raise BeepError(f"reply {r.channel}/{r.msgno} out of order, expected 1/{got}")
            kinds[r.kind] += 1
            if r.kind == "ERR":
                try:
                    codes[parse_error(r, "stream reply")[0]] += 1
                except BeepError:
                    codes["?"] += 1
            got += 1
            progressed = True
        if cur is None and next_msg < count and len(ch.pending) < MAX_UNREPLIED:
            cur, off = next_msg, 0
            ch.pending.append(cur)
            next_msg += 1
        if cur is not None:
            if cur not in ch.pending:   # pre-emptive reply: finish with an empty '.' frame
                s.send_piece(1, "MSG", cur, b"", ".")
                cur, preempted, progressed = None, preempted + 1, True
            else:
                n = min(len(body) - off, ch.send_room(), MAX_FRAME_PAYLOAD)
                if n > 0:
                    more = "." if off + n == len(body) else "*"
                    s.send_piece(1, "MSG", cur, body[off:off + n], more)
                    off += n
                    progressed = True
                    if more == ".":
                        cur = None
        now = time.monotonic()
        if progressed:
            last_progress = now
            continue
        wait = STALL_SECS - (now - last_progress)
        try:
            if wait <= 0 or s.read_frame(wait, "replies or SEQ") is None:
                raise TimeoutError
        except TimeoutError:
            raise BeepError(f"stall: no progress for {STALL_SECS:.0f}s (sent {next_msg}/{count} msgs, "
                            f"{got} replies, window room {ch.send_room()})") from None
    elapsed = time.monotonic() - t0
    s.close_channel(1)
    s.release()
    total = count * STREAM_MSG_SIZE
    return (f"{total} bytes in {count} messages, {got} replies in order "
            f"(RPY {kinds['RPY']}, ERR {kinds['ERR']}, NUL {kinds['NUL']}; ERR codes {dict(codes)}), "
            f"preempted {preempted}, SEQ frames received {s.seq_frames}, {elapsed:.2f}s, "
            f"{total / elapsed / 1048576:.1f} MiB/s")


def sc_malformed(s: Session, args) -> str:
    s.greet()
    s.quiet = True
    seq = s.channels[0].out_seq   # 52 after our greeting
    s.send_raw(b"MSG 0 1 . %d 5\r\nhelloXXXXX" % seq)
    t0 = time.monotonic()
    how = "EOF"
    try:
        while (f := s.read_frame(STALL_SECS - (time.monotonic() - t0), "close after bad frame")) is not None:
            if f.kind != "SEQ":
                raise BeepError(f"server sent {f.kind} after the malformed frame")
    except TimeoutError:
        raise BeepError(f"connection still open {STALL_SECS:.0f}s after the malformed frame") from None
    except ConnectionResetError:
        how = "reset"
    return f"server closed the connection ({how}) {time.monotonic() - t0:.3f}s after the bad trailer"


def sc_byte_at_a_time(s: Session, args) -> str:
    s.byte_mode = True
    return sc_greet_start_close(s, args) + " (every byte sent separately)"


SCENARIOS = {
    "greet-start-close": sc_greet_start_close,
    "even-channel": sc_even_channel,
    "unknown-profile": sc_unknown_profile,
    "stream": sc_stream,
    "malformed": sc_malformed,
    "byte-at-a-time": sc_byte_at_a_time,
}


# --------------------------------------------------------------------------- self-test

SELFTEST_FRAMES = [  # byte-exact frames: greetings, start and close, segmentation, ANS/NUL, SEQ
    b"RPY 0 0 . 0 217\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n"
    b"   <profile uri='http://iana.org/beep/TLS' />\r\n"
    b"   <profile uri='http://iana.org/beep/SASL/DIGEST-MD5' />\r\n"
    b"   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n",
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n",
    b"ERR 0 0 . 0 85\r\nContent-Type: application/beep+xml\r\n\r\n"
    b"<error code='421'>relay shutting down</error>\r\nEND\r\n",
    b"MSG 0 1 . 52 167\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n"
    b"   <profile uri='http://example.org/beep/NOPE' />\r\n"
    b"   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n",
    b"RPY 0 1 . 217 83\r\nContent-Type: application/beep+xml\r\n\r\n"
    b"<profile uri='http://iana.org/beep/APEX' />\r\nEND\r\n",
    b"MSG 0 2 . 219 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='4'>\r\n"
    b"   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n",
    b"ERR 0 2 . 300 104\r\nContent-Type: application/beep+xml\r\n\r\n"
    b"<error code='501'>initiator must use odd channel numbers</error>\r\nEND\r\n",
    b"MSG 0 3 . 335 71\r\nContent-Type: application/beep+xml\r\n\r\n"
    b"<close number='3' code='200' />\r\nEND\r\n",
    b"MSG 3 0 * 0 14\r\n\r\nfirst half, END\r\n",
    b"MSG 3 0 . 14 13\r\nsecond half\r\nEND\r\n",
    b"ANS 3 0 * 0 8 0\r\n\r\nans-0 END\r\n",
    b"ANS 3 0 . 8 9 1\r\n\r\nans-1\r\nEND\r\n",
    b"ANS 3 0 . 17 6 0\r\ndone\r\nEND\r\n",
    b"NUL 3 0 . 23 0\r\nEND\r\n",
    b"SEQ 1 231 4096\r\n",
    b"MSG 0 2 . 251 71\r\nContent-Type: application/beep+xml\r\n\r\n"
    b"<close number='1' code='200' />\r\nEND\r\n",
    b"RPY 0 2 . 326 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
    b"MSG 0 3 . 322 60\r\nContent-Type: application/beep+xml\r\n\r\n"
    b"<close code='200' />\r\nEND\r\n",
]

SELFTEST_BAD = [  # each must be rejected by the parser
    b"MSG 0 1 . 52 5\r\nhelloXXXXX",            # wrong trailer
    b"RPY 0 0 . 0 3\r\nabcEND\n\r",              # wrong trailer
    b"FOO 0 0 . 0 0\r\nEND\r\n",                 # keyword
    b"RPY 0  0 . 0 0\r\nEND\r\n",                # double space
    b"RPY 0 0 . 0 0 7\r\nEND\r\n",               # ansno on non-ANS
    b"ANS 1 0 . 0 0\r\nEND\r\n",                 # ANS without ansno
    b"RPY 0 0 + 0 0\r\nEND\r\n",                 # more indicator
    b"RPY 2147483648 0 . 0 0\r\nEND\r\n",        # channel out of range
    b"RPY 0 0 . 4294967296 0\r\nEND\r\n",        # seqno out of range
    b"RPY 0 -1 . 0 0\r\nEND\r\n",                # sign
    b"NUL 3 0 * 23 0\r\nEND\r\n",                # NUL with '*'
    b"NUL 3 0 . 23 1\r\nxEND\r\n",               # NUL with payload
    b"SEQ 1 231\r\n",                            # SEQ missing window
    b"SEQ 1 231 2147483648\r\n",                 # SEQ window out of range
    b"MSG 0 1 . 0 0" + b"0" * 200,               # over-long header line
]


def selftest() -> int:
    def parse_all(data: bytes, chunk: int) -> list[Frame]:
        p, out = FrameParser(), []
        for i in range(0, len(data), chunk):
            p.feed(data[i:i + chunk])
            while (f := p.next_frame()) is not None:
                out.append(f)
        if p.buf:
            raise BeepError(f"left-over bytes {bytes(p.buf)!r}")
        return out

    checks = 0
    for raw in SELFTEST_FRAMES:
        for chunk in (len(raw), 1, 7):
            frames = parse_all(raw, chunk)
            assert len(frames) == 1 and encode(frames[0]) == raw, (raw, frames)
            checks += 1
    stream = b"".join(SELFTEST_FRAMES)
    assert b"".join(encode(f) for f in parse_all(stream, 3)) == stream
    for raw in SELFTEST_BAD:
        try:
            parse_all(raw, len(raw))
        except BeepError:
            checks += 1
            continue
        raise AssertionError(f"accepted bad frame {raw!r}")
    # our builders reproduce the example payloads
    assert encode(Frame("MSG", 0, 2, ".", 219, mime(XML_CT, start_body(4, [APEX])))) == SELFTEST_FRAMES[5]
    assert encode(Frame("RPY", 0, 0, ".", 0, mime(XML_CT, greeting_body()))) == SELFTEST_FRAMES[1]
    assert encode(Frame("MSG", 0, 2, ".", 251, mime(XML_CT, close_body(1)))) == SELFTEST_FRAMES[15]
    assert encode(Frame("MSG", 0, 3, ".", 322, mime(XML_CT, close_body(0)))) == SELFTEST_FRAMES[17]
    assert mime(XML_CT, start_body(3, [NOPE, APEX])) == parse_all(SELFTEST_FRAMES[3], 1)[0].payload
    assert encode(Frame("SEQ", 1, ackno=231, window=4096)) == b"SEQ 1 231 4096\r\n"
    # message-level parsing of the examples
    greet = xml_root(parse_all(SELFTEST_FRAMES[0], 5)[0].payload, "greeting")
    assert [p.get("uri") for p in greet.findall("profile")][-1] == APEX
    err = Reply("ERR", 0, 2, parse_all(SELFTEST_FRAMES[6], 11)[0].payload)
    assert parse_error(err, "t") == (501, "initiator must use odd channel numbers")
    assert split_mime(b"\r\nfirst half, second half\r\n") == ({}, b"first half, second half\r\n")
    checks += 8
    # seqno / reply tracking through a Session with no socket traffic needed
    s = Session(None, time.monotonic() + 5)
    s.quiet = True
    s._process(parse_all(SELFTEST_FRAMES[0], 999)[0])
    assert s.completed.popleft().kind == "RPY" and s.channels[0].in_seq == 217
    s.channels[3] = Channel(3)
    s.channels[3].pending.append(0)
    for raw in SELFTEST_FRAMES[10:14]:
        s._process(parse_all(raw, 999)[0])
    r = s.completed.popleft()
    assert r.kind == "NUL" and r.answers == [b"\r\nans-1\r\n", b"\r\nans-0 done\r\n"], r
    try:
        s._process(Frame("RPY", 0, 5, ".", 0, b""))
        raise AssertionError("wrong seqno accepted")
    except BeepError:
        pass
    checks += 3
    print(f"OK: selftest {checks} checks passed")
    return 0


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Independent BEEP initiator for apexd interop tests")
    ap.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--bytes", type=int, default=1048576, help="stream: total payload octets")
    ap.add_argument("--timeout", type=float, default=20.0, help="whole-scenario timeout (s)")
    ap.add_argument("--selftest", action="store_true", help="check the frame codec offline")
    args = ap.parse_args(argv)
    if args.selftest:
        try:
            return selftest()
        except (AssertionError, BeepError) as e:
            print(f"FAIL: selftest: {e!r}", file=sys.stderr)
            return 1
    if not args.scenario or not args.port:
        ap.error("SCENARIO and --port are required (or use --selftest)")
    if args.bytes < 1 or args.timeout <= 0:
        ap.error("--bytes and --timeout must be positive")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"FAIL: refusing to connect to non-loopback host {args.host}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    sock = None
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        detail = SCENARIOS[args.scenario](Session(sock, deadline), args)
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
        if sock is not None:
            sock.close()
    print(f"OK: {args.scenario} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
