"""10,000 streams ending abnormally against one live host: what it holds afterwards.

    .venv/bin/python bench/bench_abnormal_ends.py [--ends N] [--parallel 100] [--out bench/results]

Starts a real ``hvsock-host`` and ends N streams every way but the normal one, ``--parallel`` at
a time, the kinds mixed round-robin (tests/adversity/abnormal.py): attach streams in each state
(just welcomed, listening, with a connect pending, with a relayed channel open) ended by each
malformed-frame pattern (garbage, truncated, wrong wire type), a cancel or a deadline;
SessionData streams of sessions with relayed channels (with and without unread frames in flight)
ended the same ways; WatchEvents streams likewise. Then it polls the host's own counts until
they are back at the baseline taken before the storm (or a timeout), and writes
bench/results/abnormal_ends.json: sessions, channels, ring segments, threads and fds left, how
long the host took to get there, the wall time of the storm, statuses seen, and tracebacks in
the host log.
A benchmark, not a test: it reports leftovers but exits 0 unless the run itself failed.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from hvsock.v1 import hvsock_pb2_grpc  # noqa: E402
from tests.adversity import abnormal  # noqa: E402
from tests.integration.hostproc import run_host  # noqa: E402

#: Deadlines of the deadline-ended streams: short, so a batch does not wait long for them.
DEADLINE = 0.5


def kinds(target: abnormal.Target) -> list[tuple[str, Callable[[], grpc.StatusCode]]]:
    ends = [
        *((f"malformed-{name}", "malformed", raw) for name, raw in abnormal.MALFORMED.items()),
        ("cancel", "cancel", b""),
        ("deadline", "deadline", b""),
    ]
    out: list[tuple[str, Callable[[], grpc.StatusCode]]] = []
    for label, how, raw in ends:
        for state in abnormal.ATTACH_STATES:
            out.append(
                (
                    f"attach/{state}/{label}",
                    functools.partial(abnormal.attach_ends, target, state, how, raw),
                )
            )
        for backlog in (False, True):
            out.append(
                (
                    f"session_data/{'backlog' if backlog else 'idle'}/{label}",
                    functools.partial(
                        abnormal.session_data_ends, target, how, raw, backlog=backlog
                    ),
                )
            )
        out.append((f"watch/{label}", functools.partial(abnormal.watch_ends, target, how, raw)))
    return out


def thread_names(pid: int) -> dict[str, int]:
    names: collections.Counter[str] = collections.Counter()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            names[(task / "comm").read_text().strip()] += 1
    return dict(names)


def run(ends: int, parallel: int) -> dict[str, object]:
    abnormal.DEADLINE = DEADLINE
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_host(
            pathlib.Path(tmp),
            "--close-timeout-ms",
            "500",
            # Many attach streams of the one VM at once: not what this measures.
            "--max-sessions-per-partition",
            str(4 * parallel),
        ) as host,
    ):
        channel = grpc.insecure_channel(host.target)
        admin = hvsock_pb2_grpc.AdminServiceStub(channel)
        target = abnormal.Target(host, channel, host.create_vm("storm"))
        baseline = abnormal.counts(host, admin)
        names_before = thread_names(host.proc.pid)
        mix = kinds(target)
        plan = list(itertools.islice(itertools.cycle(mix), ends))
        statuses: collections.Counter[str] = collections.Counter()
        failures: collections.Counter[str] = collections.Counter()
        peak = baseline

        def one(item: tuple[str, Callable[[], grpc.StatusCode]]) -> None:
            label, job = item
            try:
                statuses[job().name] += 1
            except Exception as exc:  # counted and reported: the storm goes on
                failures[f"{label}: {type(exc).__name__}: {str(exc)[:120]}"] += 1

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            for batch in range(0, len(plan), parallel):
                list(pool.map(one, plan[batch : batch + parallel]))
                now = abnormal.counts(host, admin)
                pairs = zip(asdict(peak).values(), asdict(now).values(), strict=True)
                peak = abnormal.Counts(*(max(a, b) for a, b in pairs))
        wall = time.monotonic() - started
        left, waited = abnormal.wait_for(host, admin, baseline, timeout=60)
        names_after = thread_names(host.proc.pid)
        # And the VM still attaches the normal way.
        again = abnormal.Attached(channel, target.vm_hello)
        again.stream.cancel()
        channel.close()
        log = list(host.log)
    bad_lines = [
        line.rstrip()
        for line in log
        if "Traceback" in line or "unexpected" in line.lower() or " ERROR " in line
    ]
    return {
        "ends": ends,
        "parallel": parallel,
        "kinds": len(mix),
        "wall_s": round(wall, 2),
        "ends_per_s": round(ends / wall, 1),
        "baseline": asdict(baseline),
        "peak_between_batches": asdict(peak),
        "left": asdict(left),
        "back_at_baseline": left.within(baseline),
        "release_wait_s": round(waited, 2),
        # By the kernel's thread name: gRPC's own (event_engine, ...) or ours (python's).
        "threads_by_name_before": names_before,
        "threads_by_name_left": names_after,
        # Python's threads carry the process's name; gRPC's core names its own.
        "host_python_threads_back": names_after.get("hvsock-host", 0)
        <= names_before.get("hvsock-host", 0),
        "statuses": dict(statuses),
        "client_side_failures": dict(failures),
        "host_log_error_lines": len(bad_lines),
        "host_log_error_sample": bad_lines[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ends", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=100)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    result = run(args.ends, args.parallel)
    report = {
        "benchmark": "abnormal_ends",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "result": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abnormal_ends.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'abnormal_ends.json'}")


if __name__ == "__main__":
    main()
