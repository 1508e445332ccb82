#!/usr/bin/env python3
"""Connection churn against one running apexd, for scripts/fault-churn: opens CONNECTIONS
sessions that greet (ATTACHING of them also attach an endpoint), holds them, reads apexd's
resident memory, closes them all, waits until apexd has closed its side, reads it again; ROUNDS
times.

    churn.py --port PORT --pid PID [--rounds R] [--connections N] [--attaching A]
             [--domain D] [--batch B] [--settle-ms MS] [--after-seconds W]
             [--min-returned-pct P] [--max-seconds S]

Prints one line per measurement (KiB from /proc/PID/status; VmRSS and RssAnon):
    BASELINE rss_kib=X anon_kib=Y fds=F
    ROUND n=K held_rss_kib=X held_anon_kib=Y closed_rss_kib=X closed_anon_kib=Y
          kib_per_conn=Z seconds=T
    SETTLED after_seconds=W rss_kib=X anon_kib=Y
    SUMMARY rounds=R connections=N attaching=A baseline_rss_kib=X peak_held_rss_kib=X
            last_closed_rss_kib=X settled_rss_kib=X max_kib_per_conn=Z returned_pct=P
kib_per_conn is (held RSS - baseline RSS) / CONNECTIONS: what each open session costs over an
apexd that has none. settled_rss_kib is the RSS --after-seconds after the last round's sessions
closed (an allocator may give pages back on a timer, not at once). returned_pct is how much of
the churn's growth (peak held RSS over the baseline) was given back by then: 100 means back to
the baseline, 0 means nothing came back. Exit 0 when every round ran and returned_pct is at least
--min-returned-pct (default 0: no bound), 1 when a round could not run (a connection refused or
reset, a greeting or attach that did not come, the time bound), 3 when too little came back.

Loopback only, bounded: at most --batch sessions are being set up at once, and the whole run
ends after --max-seconds. Standard library only; the BEEP framing comes from the independent
interop client in tests/interop.
"""
import argparse
import errno
import os
import selectors
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "interop"))

from beep_client import (  # noqa: E402
    XML_CT, BeepError, Frame, FrameParser, encode, greeting_body, mime,
)
from apex_endpoint import start_attach_body  # noqa: E402

GREETING = encode(Frame("RPY", 0, 0, ".", 0, mime(XML_CT, greeting_body())))
GREETING_PAYLOAD = len(mime(XML_CT, greeting_body()))


class Failed(Exception):
    """A round could not run; the text says why."""


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise Failed(f"no {field} in /proc/{pid}/status")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Conn:
    """One session being set up: what it still waits for from the relay."""

    def __init__(self, sock, endpoint):
        self.sock = sock
        self.endpoint = endpoint
        self.parser = FrameParser()
        self.out = b""
        self.greeted = False
        self.attached = endpoint is None
        self.sent = False

    def ready(self):
        return self.greeted and self.attached

    def request(self):
        data = GREETING
        if self.endpoint is not None:
            body = start_attach_body(1, self.endpoint, 1)
            data += encode(Frame("MSG", 0, 1, ".", GREETING_PAYLOAD, mime(XML_CT, body)))
        return data

    def feed(self, data):
        self.parser.feed(data)
        while (frame := self.parser.next_frame()) is not None:
            if frame.kind == "SEQ" or frame.channel != 0:
                continue
            if frame.msgno == 0 and frame.kind == "RPY":
                self.greeted = True
            elif frame.msgno == 0:
                raise Failed(f"the relay refused the session: {frame.payload[:120]!r}")
            elif frame.msgno == 1 and frame.kind == "RPY":
                self.attached = True
            elif frame.msgno == 1:
                raise Failed(f"attach {self.endpoint} refused: {frame.payload[:160]!r}")


def open_round(port, count, attaching, domain, round_no, batch, deadline):
    """Opens `count` sessions (the first `attaching` attach); returns their sockets."""
    sel = selectors.DefaultSelector()
    held = []
    pending = {}
    started = 0
    try:
        while len(held) < count:
            while started < count and len(pending) < batch:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(("127.0.0.1", port))
                if err not in (0, errno.EINPROGRESS):
                    sock.close()
                    raise Failed(f"connect: {os.strerror(err)}")
                endpoint = f"churn{round_no}-{started}@{domain}" if started < attaching else None
                conn = Conn(sock, endpoint)
                pending[sock.fileno()] = conn
                sel.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, conn)
                started += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"time bound reached with {len(held)} of {count} sessions open")
            for key, events in sel.select(timeout=min(left, 1.0)):
                conn = key.data
                if events & selectors.EVENT_WRITE and not conn.sent:
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise Failed(f"connect: {os.strerror(err)}")
                    conn.sock.send(conn.request())  # a few hundred octets: fits the socket
                    conn.sent = True
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    continue
                if events & selectors.EVENT_READ:
                    try:
                        data = conn.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        raise Failed(f"recv: {e}") from None
                    if not data:
                        raise Failed("the relay closed a session while it was set up")
                    conn.feed(data)
                    if conn.ready():
                        sel.unregister(conn.sock)
                        del pending[conn.sock.fileno()]
                        held.append(conn.sock)
        return held
    except (Failed, BeepError):
        for conn in pending.values():
            conn.sock.close()
        for sock in held:
            sock.close()
        raise
    finally:
        sel.close()


def wait_closed(pid, fds, deadline):
    """Waits until apexd holds no more descriptors than `fds` (its sessions have ended)."""
    while fd_count(pid) > fds:
        if time.monotonic() > deadline:
            raise Failed(f"apexd still holds {fd_count(pid) - fds} session descriptors")
        time.sleep(0.05)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--attaching", type=int, default=0)
    ap.add_argument("--domain", default="example.com")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--settle-ms", type=int, default=500)
    ap.add_argument("--after-seconds", type=float, default=15.0)
    ap.add_argument("--min-returned-pct", type=float, default=0.0)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    args = ap.parse_args(argv)
    if not (1 <= args.rounds <= 100 and 1 <= args.connections <= 100000
            and 0 <= args.attaching <= args.connections and 1 <= args.batch <= 4096
            and 0 <= args.after_seconds <= 600 and 0 <= args.min_returned_pct <= 100):
        ap.error("rounds 1-100, connections 1-100000, attaching 0-connections, batch 1-4096, "
                 "after-seconds 0-600, min-returned-pct 0-100")
    deadline = time.monotonic() + args.max_seconds
    settle = args.settle_ms / 1000

    time.sleep(settle)
    fds = fd_count(args.pid)
    base_rss = status_kib(args.pid, "VmRSS")
    base_anon = status_kib(args.pid, "RssAnon")
    print(f"BASELINE rss_kib={base_rss} anon_kib={base_anon} fds={fds}", flush=True)
    peak = 0
    worst = 0.0
    closed_rss = base_rss
    held_rss = base_rss
    try:
        for round_no in range(1, args.rounds + 1):
            began = time.monotonic()
            held = open_round(args.port, args.connections, args.attaching, args.domain,
                              round_no, args.batch, deadline)
            time.sleep(settle)
            held_rss = status_kib(args.pid, "VmRSS")
            held_anon = status_kib(args.pid, "RssAnon")
            for sock in held:
                sock.close()
            wait_closed(args.pid, fds, deadline)
            time.sleep(settle)
            closed_rss = status_kib(args.pid, "VmRSS")
            closed_anon = status_kib(args.pid, "RssAnon")
            per_conn = (held_rss - base_rss) / args.connections
            peak = max(peak, held_rss)
            worst = max(worst, per_conn)
            print(f"ROUND n={round_no} held_rss_kib={held_rss} held_anon_kib={held_anon} "
                  f"closed_rss_kib={closed_rss} closed_anon_kib={closed_anon} "
                  f"kib_per_conn={per_conn:.1f} seconds={time.monotonic() - began:.1f}",
                  flush=True)
    except (Failed, BeepError, OSError) as e:
        print(f"churn: {e}", file=sys.stderr)
        return 1
    # Not bound by --max-seconds: the rounds are, and this wait is bounded on its own (0-600 s).
    time.sleep(args.after_seconds)
    try:
        settled_rss = status_kib(args.pid, "VmRSS")
        settled_anon = status_kib(args.pid, "RssAnon")
    except (Failed, OSError) as e:
        print(f"churn: {e}", file=sys.stderr)
        return 1
    print(f"SETTLED after_seconds={args.after_seconds:g} rss_kib={settled_rss} "
          f"anon_kib={settled_anon}", flush=True)
    grown = peak - base_rss
    returned = 100.0 * (peak - settled_rss) / grown if grown > 0 else 100.0
    print(f"SUMMARY rounds={args.rounds} connections={args.connections} "
          f"attaching={args.attaching} baseline_rss_kib={base_rss} peak_held_rss_kib={peak} "
          f"last_closed_rss_kib={closed_rss} settled_rss_kib={settled_rss} "
          f"max_kib_per_conn={worst:.1f} returned_pct={int(round(returned))}", flush=True)
    if returned < args.min_returned_pct:
        print(f"churn: {returned:.0f}% of the growth came back within {args.after_seconds:g} s; "
              f"at least {args.min_returned_pct:g}% must", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
