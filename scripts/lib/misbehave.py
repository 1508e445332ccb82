#!/usr/bin/env python3
"""Misbehaving APEX endpoints for scripts/isolation: each CASE is one way of not playing by
the rules of BEEP flow control, run against one apexd while a healthy load runs beside it.

    misbehave.py --port PORT [--domain D] [--max-seconds S] [--idle] CASE [options]

Cases (the endpoints are `NAME@DOMAIN`, never the load generator's sndI/rcvI):
    stuck    stuck@ attaches and never reads; flood@ pipelines 1 KiB data to it, each with a
             statusRequest, as fast as the relay lets it (reads replies, answers reports).
             After the stuck endpoint disconnects, flood@ waits for a report on every data
             the relay accepted (`ok`).
    self     selfish@ pipelines 1 KiB data to itself, reads everything, never answers the
             deliveries.
    slow     slow@ reads --read-rate octets/s (and answers every delivery); fast@ pipelines
             1 KiB data to it as fast as the relay lets it.
    partial  partial@ opens --channels channels and sends MSG frames with `*` on each, never
             the final `.`, as far as the relay's windows let it.
    mute     mute@ opens --channels channels, then never reads and never sends SEQ again: it
             pipelines small data MSGs to nobody@ until the replies it never takes exceed the
             relay's reply bound, then fills every window it was offered with large ones.

Protocol with the driver: one line `READY ...` on stdout once the misbehaviour is under way;
SIGUSR1 (or --max-seconds) ends it: the misbehaving connections close, the helper waits for
what must still come (case stuck: the reports, at most --report-wait s) and prints one line
`RESULT key=value ...`. Exit 0 when the case ran, 1 when it could not be set up. With
--idle the misbehaviour runs at SCHED_IDLE (the driver puts this process on apexd's CPU).

The BEEP framing (header parsing, frame encoding) and the APEX documents come from the
independent interop client in tests/interop; the loop here is a lean non-blocking one so that
Python can keep up with the relay. Loopback only. Standard library only.
"""
import argparse
import collections
import errno
import os
import re
import select
import signal
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "interop"))

from beep_client import (  # noqa: E402
    MAX_HEADER, MOD, BeepError, Frame, encode, parse_header,
)
from apex_endpoint import (  # noqa: E402
    OK_PAYLOAD, Hub, data_doc, xml_payload,
)

RECV_WINDOW = 262144       # what well-behaved peers here advertise once they consume
# Octets per send() and recv(). The driver runs this process on apexd's CPU at SCHED_IDLE, and
# a kernel without preemption (PREEMPT_NONE) finishes a syscall before apexd, woken meanwhile,
# gets the CPU: a 256 KiB loopback send() is the relay's input processed in our context, and
# held apexd off long enough to quadruple the healthy load's p99. Small calls keep each one
# short.
MAX_IO = 8192
_CODE = re.compile(rb"code=['\"]([0-9]{3})['\"]")
_STATUS = re.compile(rb"<statusResponse transID=['\"]([0-9]+)['\"]")
_REPLY_CODE = re.compile(rb"<reply code=['\"]([0-9]{3})['\"]")

stop_requested = False


def _on_usr1(_sig, _frame):
    global stop_requested
    stop_requested = True


class Ch:
    """One channel's sequence and window state, and what it has in progress."""

    def __init__(self, number, out_seq=0, peer_right=4096, in_seq=0, adv_right=4096, next_msgno=0):
        self.number = number
        self.out_seq, self.peer_right = out_seq, peer_right
        self.in_seq, self.adv_right = in_seq, adv_right
        self.next_msgno = next_msgno
        self.pending = collections.deque()   # our msgnos awaiting a reply
        self.reply_asm = None                # (kind, msgno, bytearray)
        self.msg_asm = None                  # (msgno, bytearray) of a relay MSG
        self.out = collections.deque()       # (kind, msgno, payload) of replies to send

    def room(self):
        r = (self.peer_right - self.out_seq) % MOD
        return 0 if r > (1 << 31) else r


class Peer:
    """A connection after its set-up: non-blocking, frames parsed and written here.

    answer: reply RPY <ok /> to the relay's MSGs; seq: advertise windows as data is read;
    read: read the socket at all; read_rate: most octets read per second (None: no bound)."""

    def __init__(self, ep, *, answer=True, seq=True, read=True, read_rate=None):
        s = ep.session
        self.label = ep.label
        self.sock = s.sock
        self.sock.setblocking(False)
        self.answer, self.seq, self.read, self.read_rate = answer, seq, read, read_rate
        self.chans = {}
        for number, c in s.channels.items():
            self.chans[number] = Ch(number, c.out_seq, c.peer_right, c.in_seq, c.adv_right,
                                    getattr(c, "next_msgno", 0))
        self.rbuf = bytearray(s.parser.buf)
        self.roff = 0
        self.wbuf = bytearray()
        self.closed = False
        self.tokens, self.last_fill = 0.0, time.monotonic()
        self.octets_read = 0
        # Callbacks, set by the case.
        self.on_reply = lambda ch, msgno, kind, payload: None
        self.on_msg = lambda ch, msgno, payload: None

    # ---- output
    def send_frame(self, kind, ch, msgno, payload, more="."):
        self.wbuf += encode(Frame(kind, ch.number, msgno, more, ch.out_seq, payload))
        ch.out_seq = (ch.out_seq + len(payload)) % MOD

    def send_msg(self, ch, payload, more="."):
        """Our MSG in one frame; the caller checked the window."""
        msgno = ch.next_msgno
        ch.next_msgno += 1
        ch.pending.append(msgno)
        self.send_frame("MSG", ch, msgno, payload, more)
        return msgno

    def flush(self):
        """Writes what the socket takes, MAX_IO octets a call."""
        if self.closed or not self.wbuf:
            return
        off, end = 0, len(self.wbuf)
        try:
            while off < end:
                with memoryview(self.wbuf)[off:off + MAX_IO] as chunk:
                    off += self.sock.send(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
            return
        del self.wbuf[:off]

    def pump_replies(self):
        for ch in self.chans.values():
            while ch.out:
                kind, msgno, payload = ch.out[0]
                if len(payload) > ch.room():
                    break
                ch.out.popleft()
                self.send_frame(kind, ch, msgno, payload)

    # ---- input
    def on_readable(self):
        if self.closed or not self.read:
            return
        want = MAX_IO
        if self.read_rate is not None:
            now = time.monotonic()
            self.tokens = min(self.tokens + (now - self.last_fill) * self.read_rate, self.read_rate / 10)
            self.last_fill = now
            want = min(int(self.tokens), MAX_IO)
            if want < 1:
                return
        try:
            data = self.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.tokens -= len(data)
        self.octets_read += len(data)
        self.rbuf += data
        self.parse()

    def wants_read(self):
        if self.closed or not self.read:
            return False
        if self.read_rate is None:
            return True
        now = time.monotonic()
        return self.tokens + (now - self.last_fill) * self.read_rate >= 1

    def parse(self):
        buf, off = self.rbuf, self.roff
        n = len(buf)
        while off < n:
            end = buf.find(b"\r\n", off, off + MAX_HEADER)
            if end < 0:
                if n - off >= MAX_HEADER:
                    raise BeepError(f"{self.label}: header line too long")
                break
            frame, size = parse_header(bytes(buf[off:end]))
            start = end + 2
            if frame.kind == "SEQ":
                off = start
                ch = self.chans.get(frame.channel)
                if ch is not None:
                    ch.peer_right = (frame.ackno + frame.window) % MOD
                continue
            total = start + size + 5
            if total > n:
                break
            if buf[start + size:total] != b"END\r\n":
                raise BeepError(f"{self.label}: bad trailer")
            frame.payload = bytes(buf[start:start + size])
            off = total
            self.frame(frame)
        if off > 1 << 20 or off == n:
            del buf[:off]
            off = 0
        self.roff = off

    def frame(self, f):
        ch = self.chans.get(f.channel)
        if ch is None:
            return
        size = len(f.payload)
        ch.in_seq = (ch.in_seq + size) % MOD
        if self.seq and (ch.adv_right - ch.in_seq) % MOD < RECV_WINDOW // 2:
            ch.adv_right = (ch.in_seq + RECV_WINDOW) % MOD
            self.wbuf += encode(Frame("SEQ", ch.number, ackno=ch.in_seq, window=RECV_WINDOW))
        if f.kind == "MSG":
            if ch.msg_asm is None:
                ch.msg_asm = (f.msgno, bytearray())
            ch.msg_asm[1].extend(f.payload)
            if f.more == ".":
                payload = bytes(ch.msg_asm[1])
                ch.msg_asm = None
                if self.answer and f.channel != 0:
                    ch.out.append(("RPY", f.msgno, OK_PAYLOAD))
                self.on_msg(ch, f.msgno, payload)
        elif f.kind in ("RPY", "ERR"):
            if ch.reply_asm is None:
                ch.reply_asm = (f.kind, f.msgno, bytearray())
            ch.reply_asm[2].extend(f.payload)
            if f.more == ".":
                kind, msgno, payload = ch.reply_asm
                ch.reply_asm = None
                if ch.pending and ch.pending[0] == msgno:
                    ch.pending.popleft()
                self.on_reply(ch, msgno, kind, bytes(payload))

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


def reply_code(kind, payload):
    if kind == "RPY":
        return 200
    m = _CODE.search(payload)
    return int(m.group(1)) if m else 0


def filler(size, fixed):
    """Text that brings a data payload of `fixed` octets to `size`."""
    return "x" * max(1, size - fixed)


class Sender:
    """Pipelines data on one channel of `peer`, one MSG per frame, as fast as the relay's
    window, the in-flight bound and the socket let it; counts the replies."""

    def __init__(self, peer, channel, originator, recipient, size, status=False, depth=1000):
        self.peer, self.ch = peer, peer.chans[channel]
        self.originator, self.recipient = originator, recipient
        self.status, self.depth = status, depth
        opt = "<option internal='statusRequest' transID='0000000000' />" if status else ""
        probe = xml_payload(data_doc(originator, recipient, "", opt))
        self.text = filler(size, len(probe))
        self.sent = 0
        self.ok = 0
        self.codes = collections.Counter()
        self.trans_of = {}            # msgno -> transID, while the reply is awaited
        self.accepted = set()         # transIDs the relay answered ok
        self.stopped = False
        peer.on_reply = self.reply

    def payload(self, trans_id):
        opt = f"<option internal='statusRequest' transID='{trans_id:010d}' />" if self.status else ""
        return xml_payload(data_doc(self.originator, self.recipient, self.text, opt))

    def pump(self, budget=256):
        p, ch = self.peer, self.ch
        while (not self.stopped and not p.closed and budget > 0 and len(ch.pending) < self.depth
               and len(p.wbuf) < 262144):
            trans_id = self.sent + 1
            payload = self.payload(trans_id)
            if len(payload) > ch.room():
                return
            msgno = p.send_msg(ch, payload)
            if self.status:
                self.trans_of[msgno] = trans_id
            self.sent += 1
            budget -= 1

    def reply(self, ch, msgno, kind, payload):
        code = reply_code(kind, payload)
        self.codes[code] += 1
        trans_id = self.trans_of.pop(msgno, None)
        if code == 200:
            self.ok += 1
            if trans_id is not None:
                self.accepted.add(trans_id)


def loop(peers, step, until, what):
    """Runs the peers until `until()` is true; `step()` is called each round. Returns False
    when `until` did not come true before the deadline passed by the caller's closure."""
    while True:
        if until():
            return True
        step()
        for p in peers:
            if not p.closed:
                p.pump_replies()
                p.flush()
        # A write may have found the connection ended by the relay.
        live = [p for p in peers if not p.closed]
        if not live:
            time.sleep(0.05)
            continue
        rd = [p.sock for p in live if p.wants_read()]
        wr = [p.sock for p in live if p.wbuf]
        by_sock = {p.sock: p for p in live}
        if not rd and not wr:
            time.sleep(0.005)
            continue
        try:
            r, w, _ = select.select(rd, wr, [], 0.05)
        except InterruptedError:
            continue
        for s in r:
            by_sock[s].on_readable()
        for s in w:
            by_sock[s].flush()


def setup(hub, label, name, extra_channels=0, rcvbuf=None):
    ep = hub.connect(label) if rcvbuf is None else connect_small(hub, label, rcvbuf)
    ep.greet()
    ch = ep.attach(name)
    for _ in range(extra_channels):
        number = ep.next_channel
        ep.next_channel += 2
        ep.session.start_apex(number)
    return ep, ch


def connect_small(hub, label, rcvbuf):
    """hub.connect with a small receive buffer, so that a slow reader is slow on the wire."""
    from apex_endpoint import ApexSession, Endpoint
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(max(hub.deadline - time.monotonic(), 0.1))
    sock.connect((hub.host, hub.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ep = Endpoint(hub, ApexSession(sock, hub, label), label)
    hub.endpoints.append(ep)
    return ep


idle_policy = False


def ready(text):
    """The misbehaviour starts: with --idle, at SCHED_IDLE from now on (the set-up ran at the
    normal policy, so that another job cannot starve it)."""
    if idle_policy:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    print(f"READY {text}", flush=True)


def result(**fields):
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def codes_text(counter):
    return ",".join(f"{c}:{n}" for c, n in sorted(counter.items())) or "-"


def run_until_stop(peers, step, max_end):
    loop(peers, step, lambda: stop_requested or time.monotonic() >= max_end, "the stop signal")
    if idle_policy:
        # What follows (the wait for reports) must not be starved either.
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except PermissionError:
            pass


# --------------------------------------------------------------------------- cases

def case_stuck(hub, args, max_end):
    d = args.domain
    stuck_ep, _ = setup(hub, "stuck", f"stuck@{d}")
    flood_ep, flood_ch = setup(hub, "flood", f"flood@{d}")
    stuck_ep.session.sock.setblocking(False)   # never read again; only closed at the end
    flood = Peer(flood_ep)
    sender = Sender(flood, flood_ch, f"flood@{d}", f"stuck@{d}", args.size, status=True)
    reports = {}                  # transID -> reply code
    early = [0]                   # reports before the stuck endpoint left
    dup = [0]
    gone = [False]

    def on_msg(ch, msgno, payload):
        m = _STATUS.search(payload)
        if not m:
            return
        tid = int(m.group(1))
        if tid in reports:
            dup[0] += 1
        rc = _REPLY_CODE.search(payload)
        reports[tid] = int(rc.group(1)) if rc else 0
        if not gone[0]:
            early[0] += 1
    flood.on_msg = on_msg
    ready("stuck@ attached and not reading; flood@ sending 1 KiB data with statusRequest")
    run_until_stop([flood], sender.pump, max_end)
    sender.stopped = True
    stuck_ep.session.sock.close()
    gone[0] = True
    ok_before = sender.ok
    t_gone = time.monotonic()
    wait_end = t_gone + args.report_wait
    loop([flood], lambda: None,
         lambda: (not sender.ch.pending and sender.accepted.issubset(reports.keys()))
         or time.monotonic() >= wait_end or flood.closed, "the reports")
    waited = time.monotonic() - t_gone
    missing = len(sender.accepted - reports.keys())
    unasked = len(reports.keys() - sender.accepted)
    codes = collections.Counter(reports[t] for t in reports if t in sender.accepted)
    flood.close()
    # Data in flight when stuck@ left is accepted once the relay knows it gone (and reported
    # as not attached): counted apart.
    result(sent=sender.sent, accepted_ok=sender.ok, accepted_ok_before_disconnect=ok_before,
           refused=codes_text(
        collections.Counter({c: n for c, n in sender.codes.items() if c != 200})),
        unanswered=len(sender.ch.pending), reports=len(reports), reports_before_disconnect=early[0],
        report_codes=codes_text(codes), unaccounted=missing, unexpected_reports=unasked,
        duplicate_reports=dup[0], report_wait_s=f"{waited:.2f}")


def case_self(hub, args, max_end):
    d = args.domain
    ep, ch = setup(hub, "selfish", f"selfish@{d}")
    peer = Peer(ep, answer=False)
    delivered = [0]
    peer.on_msg = lambda c, m, p: delivered.__setitem__(0, delivered[0] + 1)
    sender = Sender(peer, ch, f"selfish@{d}", f"selfish@{d}", args.size)
    ready("selfish@ sending 1 KiB data to itself, never answering the deliveries")
    run_until_stop([peer], sender.pump, max_end)
    peer.close()
    result(sent=sender.sent, accepted_ok=sender.ok,
           refused=codes_text(collections.Counter({c: n for c, n in sender.codes.items() if c != 200})),
           deliveries_unanswered=delivered[0])


def case_slow(hub, args, max_end):
    d = args.domain
    slow_ep, _ = setup(hub, "slow", f"slow@{d}", rcvbuf=16384)
    fast_ep, fast_ch = setup(hub, "fast", f"fast@{d}")
    slow = Peer(slow_ep, read_rate=args.read_rate)
    delivered = [0]
    slow.on_msg = lambda c, m, p: delivered.__setitem__(0, delivered[0] + 1)
    fast = Peer(fast_ep)
    sender = Sender(fast, fast_ch, f"fast@{d}", f"slow@{d}", args.size)
    ready(f"slow@ reading {args.read_rate} octets/s; fast@ sending 1 KiB data to it")
    t0 = time.monotonic()
    run_until_stop([slow, fast], sender.pump, max_end)
    secs = time.monotonic() - t0
    slow.close()
    fast.close()
    result(sent=sender.sent, accepted_ok=sender.ok,
           refused=codes_text(collections.Counter({c: n for c, n in sender.codes.items() if c != 200})),
           delivered=delivered[0], delivered_per_s=f"{delivered[0] / secs:.0f}",
           read_kib_per_s=f"{slow.octets_read / secs / 1024:.0f}")


def case_partial(hub, args, max_end):
    d = args.domain
    ep, _ = setup(hub, "partial", f"partial@{d}", extra_channels=args.channels - 1)
    peer = Peer(ep)
    chans = [c for n, c in peer.chans.items() if n != 0]
    started = set()
    octets = [0]
    errs = collections.Counter()
    head = b"Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>"
    chunk = b"y" * 16384

    def pump():
        for ch in chans:
            if len(peer.wbuf) >= 262144:
                return
            room = ch.room()
            if room <= 0:
                continue
            if ch.number not in started:
                started.add(ch.number)
                ch.next_msgno = 0
                ch.pending.append(0)
                piece = head[:room]
            else:
                piece = chunk[:room]
            peer.send_frame("MSG", ch, 0, piece, "*")
            octets[0] += len(piece)

    peer.on_reply = lambda ch, msgno, kind, payload: errs.update([reply_code(kind, payload)])
    ready(f"partial@ sending '*' frames, never '.', on {len(chans)} channels")
    run_until_stop([peer], pump, max_end)
    peer.close()
    result(channels=len(chans), octets_sent=octets[0], replies=codes_text(errs))


def case_mute(hub, args, max_end):
    d = args.domain
    ep, _ = setup(hub, "mute", f"mute@{d}", extra_channels=args.channels - 1)
    # Every channel's SEQ (the relay's window) is read before we stop reading for good.
    s = ep.session
    t_end = time.monotonic() + 2
    while time.monotonic() < t_end and any(c.peer_right <= 4096 for n, c in s.channels.items() if n):
        s.poll()
        time.sleep(0.01)
    s.quiet = True
    peer = Peer(ep, answer=False, seq=False, read=False)
    chans = [c for n, c in peer.chans.items() if n != 0]
    small = xml_payload(data_doc(f"mute@{d}", f"nobody@{d}", "z"))
    overhead = len(xml_payload(data_doc(f"mute@{d}", f"nobody@{d}", ""))) + 1
    sent = collections.Counter()
    # Enough small MSGs that their replies (~66 octets each on the wire) pass the relay's
    # 1 MiB reply bound twice over, each channel's window filled before the next one's (the
    # replies on a channel beyond the 4096 octets of window we opened are what queue); then
    # every window is filled with large ones.
    small_target = 2 * (1 << 20) // 60

    def pump():
        for ch in chans:
            while sent["small"] < small_target and ch.room() >= len(small):
                if len(peer.wbuf) >= 1 << 20:
                    return
                peer.send_msg(ch, small)
                sent["small"] += 1
            if sent["small"] < small_target:
                continue
            if len(peer.wbuf) >= 1 << 20:
                return
            room = ch.room()
            size = min(room, 65536)
            if size - overhead < 64:
                continue
            payload = xml_payload(data_doc(f"mute@{d}", f"nobody@{d}", "w" * (size - overhead)))
            peer.send_msg(ch, payload)
            sent["big"] += 1
            sent["big_octets"] += len(payload)

    ready(f"mute@ pipelining data on {len(chans)} channels, never reading, never sending SEQ")
    run_until_stop([peer], pump, max_end)
    ended_by_relay = "yes" if peer.closed else "no"
    peer.close()
    result(channels=len(chans), small_msgs=sent["small"], big_msgs=sent["big"],
           big_octets=sent["big_octets"], unsent_octets=len(peer.wbuf),
           ended_by_relay=ended_by_relay)


CASES = {"stuck": case_stuck, "self": case_self, "slow": case_slow,
         "partial": case_partial, "mute": case_mute}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--domain", default="example.com")
    ap.add_argument("--size", type=int, default=1024, help="data payload octets")
    ap.add_argument("--channels", type=int, default=96, help="partial, mute: channels")
    ap.add_argument("--read-rate", type=int, default=102400, help="slow: octets read per second")
    ap.add_argument("--report-wait", type=float, default=15.0, help="stuck: most seconds to wait for reports")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="misbehave at most this long")
    ap.add_argument("--idle", action="store_true", help="misbehave at SCHED_IDLE (set-up at the normal policy)")
    args = ap.parse_args()
    global idle_policy
    idle_policy = args.idle
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("FAIL: loopback only", file=sys.stderr)
        return 1
    if not 1 <= args.channels <= 1024 or args.read_rate < 1:
        ap.error("--channels 1..1024, --read-rate >= 1")
    signal.signal(signal.SIGUSR1, _on_usr1)
    hub = Hub(args.host, args.port, 20.0)
    try:
        CASES[args.case](hub, args, time.monotonic() + args.max_seconds)
    except (BeepError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.EINTR:
            raise
        print(f"FAIL: {args.case}: {e}", file=sys.stderr)
        return 1
    finally:
        hub.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
