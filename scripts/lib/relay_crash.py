#!/usr/bin/env python3
"""The relay-crash fault run of scripts/fault-relay-crash (issue 19 item 7): two apexd relays
on loopback with static routes to each other, A (example.com) and B (rubble.com). fred@ on A
sends --count data messages to barney@rubble.com, each with a statusRequest; barney@ on B
reads slowly (--read-rate octets/s), so that B holds a backlog it has accepted. Once --kill-after
messages were accepted by A, B is killed with SIGKILL, restarted --down seconds later on the same
ports and barney@ attaches again. Then fred@ waits (at most --report-wait s) for a report on
every message A accepted, and one line is printed:

    RESULT sent=N accepted=N refused=N ok=N report=N unaccounted=N codes=CODE:N,... seconds=S

ok: reported 250; report: reported with another code; unaccounted: accepted, never reported.
Exit 0 when nothing is unaccounted. Loopback only; every process started is stopped by pid.
Standard library only (the framing comes from tests/interop, the loop from misbehave.py).
"""
import argparse
import collections
import os
import select
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "interop"))

import misbehave as mb  # noqa: E402
from apex_endpoint import Hub  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_relay(apexd, domain, edge, mesh, peer, config, log):
    args = [apexd, "--no-pin", "--shards", "1", "--domain", domain,
            "--edge-listen", f"127.0.0.1:{edge}", "--mesh-listen", f"127.0.0.1:{mesh}",
            "--peer", peer, "--grant", "*@example.com=core:data", "--grant",
            "*@rubble.com=core:data", "--data-dir", os.path.join(log, domain),
            "--config", config, "--log", "warn"]
    env = dict(os.environ, APEXD_DNS_LOOPBACK_ONLY="1")
    env.pop("NOTIFY_SOCKET", None)
    err = open(os.path.join(log, f"{domain}.log"), "ab")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env)
    line = proc.stdout.readline().decode()
    if not line.startswith("apexd ready"):
        proc.kill()
        proc.wait()
        raise SystemExit(f"{domain}: apexd did not start: {line!r}")
    return proc


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def attach_barney(edge, read_rate, deadline):
    while True:
        try:
            hub = Hub("127.0.0.1", edge, 5.0)
            ep, _ = mb.setup(hub, "barney", "barney@rubble.com")
            return mb.Peer(ep, read_rate=read_rate)
        except Exception:  # the relay is still starting
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--apexd", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--count", type=int, default=8000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--kill-after", type=int, default=3000)
    ap.add_argument("--down", type=float, default=1.0)
    ap.add_argument("--read-rate", type=int, default=400_000)
    ap.add_argument("--report-timeout-ms", type=int, default=5000)
    ap.add_argument("--report-wait", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    args = ap.parse_args()
    start = time.monotonic()
    end = start + args.max_seconds
    ports = {k: free_port() for k in ("a_edge", "a_mesh", "b_edge", "b_mesh")}
    config = os.path.join(args.workdir, "relay.toml")
    with open(config, "w") as f:
        f.write(f"[mesh]\nreport_timeout_ms = {args.report_timeout_ms}\n")
    peer_b = f"rubble.com=127.0.0.1:{ports['b_mesh']}"
    peer_a = f"example.com=127.0.0.1:{ports['a_mesh']}"
    a = None
    nonlocal_b = [None]
    try:
        a = start_relay(args.apexd, "example.com", ports["a_edge"], ports["a_mesh"], peer_b,
                        config, args.workdir)
        nonlocal_b[0] = start_relay(args.apexd, "rubble.com", ports["b_edge"],
                                    ports["b_mesh"], peer_a, config, args.workdir)
        barney = attach_barney(ports["b_edge"], args.read_rate, end)
        fred_ep, fred_ch = mb.setup(Hub("127.0.0.1", ports["a_edge"], 5.0), "fred",
                                    "fred@example.com")
        fred = mb.Peer(fred_ep)
        sender = mb.Sender(fred, fred_ch, "fred@example.com", "barney@rubble.com", args.size,
                           status=True, depth=500)
        reports = {}
        duplicates = [0]

        def on_report(_ch, _msgno, payload):
            m = mb._STATUS.search(payload)
            if not m:
                return
            tid = int(m.group(1))
            rc = mb._REPLY_CODE.search(payload)
            if tid in reports:
                duplicates[0] += 1
            reports.setdefault(tid, int(rc.group(1)) if rc else 0)
        fred.on_msg = on_report
        state = {"killed": False, "restart_at": None, "barney": barney}

        def step():
            if sender.sent < args.count:
                sender.pump(min(256, args.count - sender.sent))
            else:
                sender.stopped = True
            if not state["killed"] and sender.ok >= args.kill_after:
                nonlocal_b[0].send_signal(signal.SIGKILL)
                nonlocal_b[0].wait()
                state["killed"] = True
                state["barney"].close()
                state["restart_at"] = time.monotonic() + args.down
            if state["restart_at"] and time.monotonic() >= state["restart_at"]:
                state["restart_at"] = None
                nonlocal_b[0] = start_relay(args.apexd, "rubble.com", ports["b_edge"],
                                            ports["b_mesh"], peer_a, config, args.workdir)
                state["barney"] = attach_barney(ports["b_edge"], args.read_rate, end)

        peers = lambda: [fred, state["barney"]]  # noqa: E731

        def done():
            settled = (sender.sent >= args.count and not sender.ch.pending
                       and sender.accepted.issubset(reports.keys()) and state["killed"]
                       and state["restart_at"] is None)
            return settled or time.monotonic() >= end

        while not done():
            step()
            for p in peers():
                if not p.closed:
                    p.pump_replies()
                    p.flush()
            live = [p for p in peers() if not p.closed]
            rd = [p.sock for p in live if p.wants_read()]
            wr = [p.sock for p in live if p.wbuf]
            by = {p.sock: p for p in live}
            if not rd and not wr:
                time.sleep(0.005)
                continue
            r, w, _ = select.select(rd, wr, [], 0.05)
            for s in r:
                by[s].on_readable()
            for s in w:
                by[s].flush()
        accepted = sender.accepted
        codes = collections.Counter(reports[t] for t in accepted if t in reports)
        unaccounted = len(accepted - reports.keys())
        refused = sum(n for c, n in sender.codes.items() if c != 200)
        mb.result(sent=sender.sent, accepted=len(accepted), refused=refused,
                  unanswered=len(sender.ch.pending), ok=codes.get(250, 0),
                  report=sum(n for c, n in codes.items() if c != 250),
                  unaccounted=unaccounted, duplicates=duplicates[0],
                  codes=mb.codes_text(codes), seconds=f"{time.monotonic() - start:.1f}")
        fred.close()
        state["barney"].close()
        return 0 if unaccounted == 0 and not sender.ch.pending else 1
    finally:
        stop(a)
        stop(nonlocal_b[0])


if __name__ == "__main__":
    sys.exit(main())
