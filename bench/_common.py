"""Shared helpers of the bench/ scripts: machine info, JSON results, peak-memory probes, timing."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / ".cache" / "bench"          # git-ignored: synthetic tables, scratch warehouses

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_total_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(values) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------- peak memory
def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def python_peak_rss_mib() -> float:
    """Peak RSS of this Python process (kernel high-water mark, ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def find_driver_jvm() -> int | None:
    """pid of the driver JVM of this Python driver: its child `java` when pyspark launched it,
    its parent `java` when spark-submit launched Python."""
    import psutil

    me = psutil.Process()
    candidates = []
    parent = me.parent()
    if parent is not None:
        candidates.append(parent)
    candidates += me.children(recursive=True)
    for proc in candidates:
        try:
            if proc.name() == "java" or os.path.basename(proc.exe()) == "java":
                return proc.pid
        except (psutil.Error, OSError):
            continue
    return None


def jvm_memory_mib(pid: int | None) -> dict:
    """Peak (VmHWM) and current (VmRSS) resident memory of `pid` in MiB."""
    if pid is None:
        return {"peak_rss_mib": None, "rss_mib": None}
    hwm, rss = _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS")
    return {"peak_rss_mib": hwm / 1024.0 if hwm else None, "rss_mib": rss / 1024.0 if rss else None}


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"
