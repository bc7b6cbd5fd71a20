#!/usr/bin/env python3
"""Collector ingest rate: 50 concurrent senders -> `edgepipe serve` on loopback.

Starts the real collector (`python -m edgepipe.pipeline.cli serve`) as a separate
process with a fresh results store -- SQLite, then PostgreSQL (a private server on
loopback, default durability) -- then N sender threads in this process each
POST reports; then the same burst again the way a device delivers (spool on
disk, POST, remove on ack). Prints reports/s ingested and how many were lost
(ids sent minus ids stored). Target: >= 1000 reports/s, 0 lost.

Two robustness phases follow (issue 10): a burst where every third report is
schema-valid but unstorable (an integer beyond 64 bits, a lone surrogate), which
must get 422 while every good one gets 201; and authorized POST latency while
200 connections idle or trickle one byte every 0.5 s (target: median < 1 s).

    .venv/bin/python scripts/bench/collector_load.py [--senders 50] [--per-sender 40] [--slow-clients 200]
        [--db sqlite|postgresql|both]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edgepipe.device.http import ClientError, request  # noqa: E402
from edgepipe.device.report import new_report  # noqa: E402
from edgepipe.device.send import Spool, send_report  # noqa: E402

TOKEN = "load-test-token"


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process (Linux /proc), 0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def make_report(k: int, i: int) -> dict:
    """A report of realistic size (~2 KB): every block a bench report carries."""
    p50 = 10.0 + (i % 7)
    stats = {"n": 200, "mean": p50, "std": 0.3, "min": p50 * 0.9, "p50": p50, "p90": p50 * 1.1,
             "p99": p50 * 1.3, "max": p50 * 2}
    return new_report(
        "bench",
        device={"hostname": f"pi-{k:02d}", "board": "Raspberry Pi 5 Model B Rev 1.0",
                "cpu": "Cortex-A76", "machine": "aarch64", "cores": 4, "os": "Debian GNU/Linux 12",
                "python": "3.11.2", "governor": "performance", "temperature_c": {"start": 48.2, "end": 55.1},
                "throttled": {"start": "0x0", "end": "0x0"}, "memory_mb": 8064},
        runtime={"backend": "ai_edge_litert", "version": "2.3.0", "delegate": "cpu", "threads": 4,
                 "cpu_fallback_ops": None, "load": "cold"},
        model={"name": "mobilenet_v2-int8", "recipe": "int8", "sha256": "ab" * 32, "size": 3_900_000},
        load_ms={"file_read": 1.2, "interpreter_build": 20.5, "delegate": 0.0, "allocate": 3.3,
                 "first_invoke": 40.1},
        latency_ms=stats, throughput={"fps": 1000 / p50, "mode": "sequential", "workers": 1, "frames": 200},
        peak_rss_mb=80.5, settings={"runs": 200, "warmup": 10, "seed": i},
    )


def run(mode: str, url: str, proc, tmp: Path, senders: int, per_sender: int) -> tuple:
    """One burst; prints its figures and returns (rate, lost)."""
    reports = [[make_report(k, i) for i in range(per_sender)] for k in range(senders)]
    failures = []
    barrier = threading.Barrier(senders + 1)

    def sender(k: int) -> None:
        spool = Spool(tmp / f"spool-{mode}-{k}")
        barrier.wait()
        for r in reports[k]:
            try:
                if mode == "post":
                    request("POST", url + "/v1/reports", body=r, token=TOKEN)
                else:
                    res = send_report(r, url, spool=spool, token=TOKEN, attempts=5, backoff=0.05)
                    if res.pending:
                        failures.append(res.error)
            except Exception as e:  # counted as lost below
                failures.append(str(e))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    barrier.wait()
    cpu0 = cpu_seconds(proc.pid)
    me0 = time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    server_cpu = cpu_seconds(proc.pid) - cpu0
    sender_cpu = time.process_time() - me0
    sent = {r["id"] for rs in reports for r in rs}
    stored = set()
    for k in range(senders):
        _, page = request("GET", url + f"/v1/reports?device=pi-{k:02d}&limit=10000", token=TOKEN, timeout=60)
        stored |= {r["id"] for r in page["reports"]}
    lost = len(sent - stored)
    rate = len(sent) / elapsed
    label = "plain POSTs" if mode == "post" else "device path: spool on disk + POST + ack"
    print(f"{senders} senders x {per_sender} reports, {label}")
    print(f"  ingested {len(sent & stored)} / {len(sent)} in {elapsed:.2f} s = {rate:.0f} reports/s; "
          f"lost {lost}; send failures {len(failures)}")
    if server_cpu > 0:
        print(f"  collector CPU {server_cpu * 1e6 / len(sent):.0f} us/report (~{len(sent) / server_cpu:.0f} "
              f"reports/s per free core); senders' CPU {sender_cpu * 1e6 / len(sent):.0f} us/report")
    return rate, lost


def unstorable(k: int, i: int) -> dict:
    """Schema-valid but unstorable: alternately threads = 2**70 and a lone surrogate in the hostname."""
    r = make_report(k, i)
    if i % 2:
        r["runtime"]["threads"] = 2 ** 70
    else:
        r["device"]["hostname"] = "pi-\ud800"
    return r


def run_mixed(url: str, senders: int, per_sender: int) -> int:
    """Good and unstorable reports at once; returns how many answers were wrong."""
    work = [[(unstorable(k, i), 422) if i % 3 == 2 else (make_report(k, i), 201) for i in range(per_sender)]
            for k in range(senders)]
    got, lock = [], threading.Lock()

    def sender(items) -> None:
        for r, want in items:
            try:
                status = request("POST", url + "/v1/reports", body=r, token=TOKEN, timeout=60)[0]
            except ClientError as e:
                status = e.status
            with lock:
                got.append((want, status))

    threads = [threading.Thread(target=sender, args=(w,)) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    good = [s for w, s in got if w == 201]
    bad = [s for w, s in got if w == 422]
    good_failed = sum(s != 201 for s in good)
    print(f"{senders} senders, every third report unstorable: good {len(good)} -> "
          f"{good_failed} failed ({100 * good_failed / max(1, len(good)):.1f}%); unstorable {len(bad)} -> "
          f"{sum(s == 422 for s in bad)} answered 422, {sum(s == 500 for s in bad)} answered 500")
    return good_failed + sum(s != 422 for s in bad)


def run_slow_clients(url: str, n: int, seconds: float = 6.0) -> float:
    """Median latency of authorized POSTs while ``n`` loopback clients idle or trickle."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    socks = [socket.create_connection((host.strip("[]"), int(port)), timeout=5) for _ in range(n)]
    trickle = socks[: n // 2]
    stop = threading.Event()

    def trickler() -> None:
        head, i = b"POST /v1/reports HTTP/1.1\r\nHost: x\r\n" * 8, 0
        while not stop.wait(0.5):
            for s in trickle:
                try:
                    s.send(head[i % len(head):][:1])
                except OSError:
                    pass
            i += 1

    t = threading.Thread(target=trickler, daemon=True)
    t.start()
    times, t_end = [], time.monotonic() + seconds
    try:
        time.sleep(1.0)
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            try:
                request("POST", url + "/v1/reports", body=make_report(99, len(times)), token=TOKEN, timeout=10)
                times.append(time.perf_counter() - t0)
            except ClientError:
                times.append(float("inf"))
            time.sleep(0.2)
    finally:
        stop.set()
        t.join()
        for s in socks:
            s.close()
    med = statistics.median(times)
    print(f"{n} idle/trickling connections: {len(times)} authorized POSTs, median {med * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms, failed {sum(x == float('inf') for x in times)}")
    return med


def serve(db: str, tmp: Path):
    """`edgepipe serve` on a free loopback port for ``db``; returns (process, url) or (process, None)."""
    env = dict(os.environ, EDGEPIPE_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe.pipeline.cli", "serve", "--port", "0", "--db", db,
                             "--quiet"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        print(f"collector did not start: {line!r}", file=sys.stderr)
        return proc, None
    return proc, line.split()[3]


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_backend(label: str, db: str, tmp: Path, args, slow_clients: int) -> tuple:
    """Every phase against one results store; returns (rate, lost, wrong, slow median)."""
    proc, url = serve(db, tmp)
    if url is None:
        stop(proc)
        return 0.0, -1, -1, float("inf")
    try:
        print(f"\n== {label}: `edgepipe serve` on loopback, fresh database "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; figures are noisy)")
        rate, lost = run("post", url, proc, tmp, args.senders, args.per_sender)
        # Same burst through edgepipe.device.send: on one box the senders' spool fsyncs
        # compete with the collector; on real devices each has its own disk.
        _, lost2 = run("send", url, proc, tmp, args.senders, args.per_sender)
        wrong = run_mixed(url, min(args.senders, 20), 30)
        slow = run_slow_clients(url, slow_clients) if slow_clients else 0.0
        return rate, lost + lost2, wrong, slow
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=50)
    ap.add_argument("--per-sender", type=int, default=40)
    ap.add_argument("--slow-clients", type=int, default=200, help="idle/trickling connections (0 skips)")
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both",
                    help="results store(s) to load; postgresql starts a private server on loopback")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-load-"))
    results, cluster = {}, None
    try:
        if args.db in ("sqlite", "both"):
            results["sqlite"] = bench_backend("SQLite", str(tmp / "results.db"), tmp, args, args.slow_clients)
        if args.db in ("postgresql", "both"):
            sys.path.insert(0, str(REPO / "tests"))
            from pgcluster import PgCluster, missing_reason

            why = missing_reason()
            if why:
                print(f"\n== PostgreSQL skipped: {why}")
            else:
                # Default durability (fsync, synchronous commit): the figure a team's server gives.
                cluster = PgCluster(fast=False).start()
                results["postgresql"] = bench_backend("PostgreSQL", cluster.url, tmp, args,
                                                      0 if "sqlite" in results else args.slow_clients)
        print()
        bad = 0
        for name, (rate, lost, wrong, slow) in results.items():
            ok = rate >= 1000 and lost == 0 and wrong == 0 and slow < 1.0
            print(f"{name:<10} {rate:6.0f} reports/s ingested, lost {lost}, wrong answers {wrong}"
                  + (f", slow-client median {slow * 1000:.1f} ms" if slow else "")
                  + f" -> {'OK' if ok else 'MISSED'} (target >= 1000 reports/s, 0 lost, 0 wrong)")
            bad += (lost != 0) + (wrong != 0) + (slow >= 1.0)
        return 0 if bad == 0 and results else 1
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
