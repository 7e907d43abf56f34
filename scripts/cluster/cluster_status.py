"""Helpers of the scripts/cluster/*.sh scripts (standard library only).

    python scripts/cluster/cluster_status.py --check-ports 7077 8080 8081 8082
        exit 0 when every port is free on 127.0.0.1, 1 (naming the taken ones) otherwise
    python scripts/cluster/cluster_status.py --url http://127.0.0.1:8080/json/ --workers 2 [--timeout 60]
        wait until the standalone master reports ALIVE with >= N ALIVE workers; print them
    python scripts/cluster/cluster_status.py --url ... --apps
        print the master's running and completed applications (with their executors' cores)
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request


def ports_free(ports: list[int]) -> list[int]:
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    return taken


def master_state(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def alive_workers(state: dict) -> list[dict]:
    return [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]


def wait_for_workers(url: str, n: int, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = master_state(url)
        if state and state.get("status") == "ALIVE" and len(alive_workers(state)) >= n:
            return state
        time.sleep(1.0)
    return None


def describe(state: dict) -> str:
    lines = [f"master {state.get('url')} status {state.get('status')}: "
             f"{len(alive_workers(state))} ALIVE worker(s), {state.get('cores')} cores, "
             f"{state.get('memory')} MiB"]
    for w in state.get("workers", []):
        lines.append(f"  worker {w.get('id')} {w.get('host')}:{w.get('port')} state {w.get('state')} "
                     f"cores {w.get('cores')} memory {w.get('memory')} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-ports", type=int, nargs="+")
    ap.add_argument("--url")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--apps", action="store_true")
    args = ap.parse_args(argv)
    if args.check_ports:
        taken = ports_free(args.check_ports)
        if taken:
            print(f"[cluster] port(s) in use on 127.0.0.1: {taken}")
            return 1
        return 0
    if not args.url:
        ap.error("give --check-ports or --url")
    if args.apps:
        state = master_state(args.url)
        if state is None:
            print(f"[cluster] no master answers at {args.url}")
            return 1
        for kind in ("activeapps", "completedapps"):
            for app in state.get(kind, []):
                print(f"[cluster] {kind[:-4]} app {app.get('id')} {app.get('name')!r} "
                      f"state {app.get('state')} cores {app.get('cores')} "
                      f"duration {app.get('duration', 0) / 1000:.0f} s")
        return 0
    state = wait_for_workers(args.url, args.workers, args.timeout)
    if state is None:
        last = master_state(args.url)
        print(f"[cluster] master at {args.url} did not report {args.workers} ALIVE worker(s) "
              f"within {args.timeout:.0f} s" + (f":\n{describe(last)}" if last else
                                                 " (no answer)"))
        return 1
    print("[cluster] " + describe(state).replace("\n", "\n[cluster] "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
