"""Shared helpers for the benchmark scripts: machine and version info, timing, JSON results.

Every script states where and how it ran: `run_info()` gathers the machine, the library versions and
the Keras backend, and `write_json` stores it next to the figures under `benchmarks/results/`.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2**30


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


def write_json(name, data, path=None):
    """Write `data` to `path` (default benchmarks/results/<name>.json) and return the path.

    The file is replaced in one step, so a run that writes as it goes never leaves half a file.
    """
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Trials in memory-capped child processes: running out of memory ends the trial, not the run.

_OOM_MARKERS = (
    "resourceexhausted",
    "oom",
    "out of memory",
    "bad_alloc",
    "memoryerror",
    "failed to allocate",
)


def looks_like_oom(text):
    """Whether an error message or a stderr tail reads as running out of memory."""
    text = text.lower()
    return any(marker in text for marker in _OOM_MARKERS)


def child_trial_main(spec_json, run):
    """The child side of `run_in_capped_child`: caps the address space, runs `run(**spec)` and
    writes its JSON-able result (or the failure: "oom" or "error", with the message)."""
    spec = json.loads(spec_json)
    limit = spec.pop("memory_limit_bytes")
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out_path = spec.pop("out")
    try:
        result = run(**spec)
    except Exception as error:  # noqa: BLE001 - any failure of the trial is its result
        failure = "oom" if looks_like_oom(repr(error)) else "error"
        result = {"ok": False, "failure": failure, "message": repr(error)[-500:]}
    with open(out_path, "w") as f:
        json.dump(result, f)


def status_gib(field):
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since exec, VmPeak: peak
    address space) in GiB, or None where the file or the field is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def fmt(value, spec, missing="-"):
    """`format(value, spec)`, or `missing` for None: a table cell."""
    return missing if value is None else format(value, spec)


def add_trial_arguments(parser, trial_timeout_s=1200.0):
    """The options of a script whose trials run in capped children (`run_in_capped_child`):
    `--memory-limit-gb`, `--trial-timeout` and the hidden `--_trial` a child is started with."""
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument(
        "--trial-timeout", type=float, default=trial_timeout_s, help="seconds per trial"
    )
    parser.add_argument("--_trial", help=argparse.SUPPRESS)


def capped_memory_limit_gb(requested_gb, margin_gb=2.0):
    """`requested_gb`, lowered to what the machine has free less `margin_gb` (never below 1 GiB):
    a trial's cap must never ask for more memory than there is."""
    _, available = memory_gib()
    if available is None:
        return requested_gb
    return max(1.0, min(requested_gb, available - margin_gb))


def run_in_capped_child(script, spec, *, memory_limit_gb, timeout_s, env=None, poll_s=0.1):
    """Runs `python script --_trial JSON` (the script calls `child_trial_main` on it) in a new
    process group whose address space is capped at `memory_limit_gb` (None or 0: no cap).

    Returns the child's result dict, or {"ok": False, "failure": "timeout" | "oom" | "crash",
    "message": stderr tail} when it wrote none, plus "exit_code" and "wait4_maxrss_gib": the
    child's peak RSS from `wait4`, which is known even for a child killed by running out of
    memory (the parent is small when it forks, so the figure is the child's own), and
    "peak_rss_gib": the child's own high-water mark where its result reports one
    ("hwm_rss_gib", from `status_gib("VmHWM")`), else the `wait4` figure.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        limit = int((memory_limit_gb or 0) * GIB)
        spec = {**spec, "out": out, "memory_limit_bytes": limit}
        child_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        with open(os.path.join(tmp, "stderr"), "w+") as stderr:
            child = subprocess.Popen(
                [sys.executable, os.path.abspath(script), "--_trial", json.dumps(spec)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=child_env,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout_s
            status, usage, timed_out = None, None, False
            while status is None:
                pid, wait_status, wait_usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    status, usage = wait_status, wait_usage
                elif time.monotonic() > deadline:
                    os.killpg(child.pid, signal.SIGKILL)
                    timed_out = True
                    _, status, usage = os.wait4(child.pid, 0)
                else:
                    time.sleep(poll_s)
            exit_code = os.waitstatus_to_exitcode(status)  # already reaped
            stderr.seek(0)
            stderr_tail = stderr.read()[-2000:]
        if os.path.exists(out):
            with open(out) as f:
                result = json.load(f)
        else:
            if timed_out:
                failure = "timeout"
            elif looks_like_oom(stderr_tail) or exit_code in (-6, -9, -11):
                failure = "oom"  # abort, the kernel's kill or a failed allocation's segfault
            else:
                failure = "crash"
            result = {"ok": False, "failure": failure, "message": stderr_tail[-500:]}
    result["exit_code"] = exit_code
    result["wait4_maxrss_gib"] = usage.ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux
    result["peak_rss_gib"] = result.get("hwm_rss_gib") or result["wait4_maxrss_gib"]
    return result
