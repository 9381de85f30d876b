"""What every benchmark shares: the machine description, a printed table, a JSON record."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import jax


def machine() -> dict:
    """Where a number was measured: CPU model and cores, devices, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "commit": _commit()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn, *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` (which must block until done) over `repeats` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values) -> float:
    return statistics.median(values)


def report(name: str, rows: list[dict], out_dir: str, extra: dict | None = None) -> str:
    """Prints rows as a table and writes {machine, rows, ...} to <out_dir>/<name>.json."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, f,
                  indent=2)
    print(f"wrote {path}")
    return path


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
