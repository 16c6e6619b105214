"""The relay with the default rings (2/3 pages) and 64-page rings, with the default relay window
and with the strict one (window 0: a ring's back-pressure byte for byte), against raw grpcio in
the same run.

    .venv/bin/python bench/bench_relay_window.py [--quick] [--rounds N] [--out bench/results]

It runs bench_e2e's points (same worker processes, same host service) for the relay kinds only,
twice: once as configured, once with HVSOCK_RELAY_WINDOW=0 in every process (the host's default
and every socket's window). Writes relay_window.json and prints each throughput with its ratio
to grpc-raw, the 64 B round trip and connect+accept+close rates.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

import bench_e2e

KINDS = ["relay-default", "relay-vm-default", "relay", "relay-vm", "grpc-raw"]
SIZES = [16384, 65536, 262144]


def _one(args: argparse.Namespace, strict: bool) -> dict[str, Any]:
    if strict:
        os.environ["HVSOCK_RELAY_WINDOW"] = "0"
    else:
        os.environ.pop("HVSOCK_RELAY_WINDOW", None)
    bench_e2e.THROUGHPUT_KINDS = KINDS
    bench_e2e.SIZES = SIZES
    bench_e2e.RTT_KINDS = ["relay", "relay-vm"]
    bench_e2e.CONNECT_KINDS = ["relay", "relay-vm"]
    return bench_e2e.run(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short points")
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds of every point (bench_e2e's --rounds)"
    )
    parser.add_argument("--out", default="bench/results", help="where to write the JSON")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for name, strict in (("window", False), ("strict", True)):
        results = _one(args, strict)
        raw = {
            s: results["throughput"].get("grpc-raw", {}).get(str(s), {}).get("MBps") for s in SIZES
        }
        rows = {}
        for kind in KINDS[:-1]:
            row = results["throughput"].get(kind, {})
            rows[kind] = {
                str(s): {
                    "MBps": row.get(str(s), {}).get("MBps"),
                    "vs_grpc_raw": (row.get(str(s), {}).get("MBps") or 0) / raw[s]
                    if raw[s]
                    else None,
                }
                for s in SIZES
            }
        report[name] = {
            "throughput": rows,
            "grpc_raw_MBps": raw,
            "rtt": results["rtt"],
            "connect": results["connect"],
            "loadavg_start": results["meta"]["loadavg_start"],
        }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relay_window.json").write_text(json.dumps(report, indent=2))
    for name, part in report.items():
        print(f"{name}: MB/s (x grpc-raw)      " + "".join(f"{s // 1024:>14} KiB" for s in SIZES))
        for kind, row in part["throughput"].items():
            cells = "".join(
                f"{row[str(s)]['MBps'] or 0:>11.0f} ({row[str(s)]['vs_grpc_raw'] or 0:.2f}x)"
                for s in SIZES
            )
            print(f"  {kind:<24}{cells}")
        print(
            "  grpc-raw                "
            + "".join(f"{v or 0:>18.0f}" for v in part["grpc_raw_MBps"].values())
        )
        for kind, rtt in part["rtt"].items():
            print(f"  rtt {kind:<8} p50 {rtt.get('p50_us', 0):8.1f} us")
        for kind, rate in part["connect"].items():
            print(f"  connect+accept+close {kind:<8} {rate.get('per_s', 0):6.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
