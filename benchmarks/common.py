"""Shared helpers for the benchmark scripts: machine and version info, timing, JSON results.

Every script states where and how it ran: `run_info()` gathers the machine, the library versions and
the Keras backend, and `write_json` stores it next to the figures under `benchmarks/results/`.
"""

import datetime
import json
import os
import platform
import statistics
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib():
    """(total, available) system memory in GiB from /proc/meminfo, or (None, None) elsewhere."""
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, rest = line.split(":", 1)
                values[name] = int(rest.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        return None, None
    return values.get("MemTotal"), values.get("MemAvailable")


def _version(module_name):
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def run_info(**settings):
    """Machine, versions, backend and the given settings, as a JSON-able dict."""
    import keras

    total, available = memory_gib()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_gib": None if total is None else round(total, 1),
            "memory_available_gib": None if available is None else round(available, 1),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            "numpy": _version("numpy"),
            "tensorflow": _version("tensorflow")
            if keras.backend.backend() == "tensorflow"
            else None,
            "jax": _version("jax") if keras.backend.backend() == "jax" else None,
        },
        "backend": keras.backend.backend(),
        "settings": settings,
    }
    if keras.backend.backend() == "jax":
        import jax

        info["machine"]["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def time_call(fn, *, warmup=1, repeats=5):
    """Seconds per call of `fn()`, over `repeats` calls after `warmup` calls.

    `fn` must block until its result is ready (convert to numpy or call `block_until_ready`).
    Returns the median and min wall-clock time, and the median process CPU time (all threads): on
    a machine shared with other jobs, CPU time is the steadier measure of the work done.
    """
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_median_s": statistics.median(cpu_times),
        "times_s": times,
    }


def _summary(times, cpu_times):
    return {
        "min_s": min(times),
        "median_s": statistics.median(times),
        "cpu_min_s": min(cpu_times),
        "cpu_median_s": statistics.median(cpu_times),
        "times_s": times,
        "cpu_times_s": cpu_times,
    }


def time_interleaved(fns, *, warmup=1, repeats=5):
    """Time several callables in rounds (each one once per round), for fair ratios between them.

    On a machine shared with other jobs the load drifts; interleaving exposes every callable to
    the same drift, and the minimum over rounds is the least disturbed estimate of each one's
    cost. `fns` maps names to callables that block until their result is ready; a callable that
    raises is dropped and its error returned under its name as {"error": ...}.

    Returns {name: {"min_s", "median_s", "cpu_min_s", "cpu_median_s", "times_s", "cpu_times_s"}}.
    """
    live, failed = dict(fns), {}

    def call(name):
        try:
            live[name]()
            return True
        except Exception as error:  # noqa: BLE001 - reported to the caller, not raised
            failed[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            del live[name]
            return False

    for _ in range(warmup):
        for name in list(live):
            call(name)
    times = {name: [] for name in live}
    cpu_times = {name: [] for name in live}
    for _ in range(repeats):
        for name in list(live):
            start, cpu_start = time.perf_counter(), time.process_time()
            if call(name):
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    results = {name: _summary(times[name], cpu_times[name]) for name in live}
    results.update(failed)
    return results


def write_json(name, data):
    """Write `data` to benchmarks/results/<name>.json and return the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    return path
