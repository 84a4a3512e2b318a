"""Speed of the FAVOR core vs exact attention: forward+backward time, ratios and GFLOP/s.

Times `keras_favor.ops.favor_attention` (non-causal and causal) and
`keras.ops.dot_product_attention` on random inputs (B, L, N, H), forward+backward with the gradient
with respect to query, key and value, at several lengths, with and without XLA, and a square
float32 matmul timed next to each length's cases as the machine's reference rate (the better of
the modes; "%matmul" is FAVOR's effective GFLOP/s over it). One run prints everything and
writes benchmarks/results/ops_speed.json (a run without TensorFlow: ops_speed_<backend>.json).

    python -m benchmarks.ops_speed                  # L = 1024, 4096, 8192, 16384
    python -m benchmarks.ops_speed --quick          # a smoke run in about a minute
    python -m benchmarks.ops_speed --backends tensorflow,jax
    python -m benchmarks.ops_speed --backends jax   # writes ops_speed_jax.json

Timing. All cases of one length (both modes, and the reference matmul) are compiled first, then
timed in interleaved rounds, each case once per round; the minimum over rounds is reported (the
median and process CPU times are stored too). On a machine shared with other jobs this keeps
the ratios fair; CPU-time ratios are printed as a cross-check.

Modes. TensorFlow: "graph" is `tf.function` without XLA, "xla" is `tf.function(jit_compile=True)`.
JAX: "xla" is `jax.jit` (JAX has no graph mode without XLA).

FLOP counting (the matmul FLOPs the algorithm performs; element-wise work is not counted), with
F = M random features and D+1 value columns (the normaliser rides along as a column):
  - features: 2·B·N·(T+S)·M·H forward; the backward computes d(query), d(key) only (the
    projection is not trained): 1× again, so ×2 in all;
  - non-causal core: V1ᵀφ(K) and φ(Q)·(…): 2·B·N·S·F·(D+1) + 2·B·N·T·F·(D+1) forward; the
    backward has two products per forward product: ×3 in all;
  - causal core (chunk C, K chunks): the same two products per chunk, plus the in-chunk scores
    2·B·N·L·C·F and their product with V1 2·B·N·L·C·(D+1), plus the prefix sums over chunks (as
    triangular matmuls); ×3 in all.
The issue's simpler convention (everything ×3) is stored as well (`gflop_x3`).

Exact attention forward+backward keeps about four (B, N, L, L) float32 tensors alive; when that
estimate exceeds the available memory the case is reported as out of memory and not run.
"""

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile

# `python benchmarks/ops_speed.py` as well as `python -m benchmarks.ops_speed`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402 (imports no backend: main() picks one first)
    memory_gib,
    run_info,
    time_interleaved,
    write_json,
)

# A backend must be chosen before Keras is imported (see main()).

DEFAULT_LENGTHS = (1024, 4096, 8192, 16384)
EXACT_LIVE_SCORE_TENSORS = 4  # scores, probabilities and their two gradients


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="key dim H = value dim D")
    p.add_argument("--features", type=int, default=256, help="random features M")
    p.add_argument("--feature-map", type=str, default="softmax_positive")
    p.add_argument("--chunk-size", type=int, default=None, help="causal chunk (default: the ops')")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed rounds, each case once per round (min kept)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
    p.add_argument("--modes", type=str, default="graph,xla", help="graph and/or xla")
    p.add_argument(
        "--backends",
        type=str,
        default=None,
        help="comma-separated Keras backends (default: KERAS_BACKEND or tensorflow)",
    )
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n×n @ n×n reference")
    p.add_argument("--skip-exact", action="store_true", help="do not time dot_product_attention")
    p.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="memory budget for the out-of-memory estimate (default: available memory)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="L = 1024, 2048; 2 repeats; 1024 matmul (a smoke test, not a measurement)",
    )
    p.add_argument(
        "--output",
        type=str,
        default=None,
        help="JSON path (default: benchmarks/results/ops_speed.json)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = args.lengths or "1024,2048"
        args.repeats = min(args.repeats, 2)
        args.matmul_size = min(args.matmul_size, 1024)
    args.lengths = [
        int(x) for x in (args.lengths or ",".join(map(str, DEFAULT_LENGTHS))).split(",")
    ]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    default_backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    args.backends = [b.strip() for b in (args.backends or default_backend).split(",") if b.strip()]
    return args


# ---------------------------------------------------------------------------------------------
# FLOP counts


def favor_flops(batch, heads, length, dim, features, causal, chunk_size):
    """(exact, x3-convention) matmul FLOPs of forward+backward, see the module docstring."""
    b, n, t, h, f, d1 = batch, heads, length, dim, features, dim + 1
    feat_fwd = 2 * b * n * (2 * t) * f * h
    core_fwd = 2 * b * n * t * f * d1 * 2
    if causal:
        c = max(1, min(chunk_size, t))
        k = -(-t // c)
        core_fwd += 2 * b * n * k * c * c * f + 2 * b * n * k * c * c * d1
        from keras_favor.ops.linear_attention import _PREFIX_BLOCK

        state = f * d1
        if k <= 2 * _PREFIX_BLOCK:
            core_fwd += 2 * b * n * k * k * state
        else:
            g = _PREFIX_BLOCK
            kb = -(-k // g)
            core_fwd += 2 * b * n * kb * g * g * state + 2 * b * n * kb * kb * state
    return 2 * feat_fwd + 3 * core_fwd, 3 * (feat_fwd + core_fwd)


def exact_flops(batch, heads, length, dim):
    # QKᵀ and PV forward, two products each backward.
    return 3 * (2 * batch * heads * length * length * dim * 2)


def exact_memory_gib(batch, heads, length):
    return EXACT_LIVE_SCORE_TENSORS * batch * heads * length * length * 4 / 2**30


# ---------------------------------------------------------------------------------------------
# Timed functions


def make_runner(backend, mode, fn, args_):
    """A no-argument callable that runs forward+backward of sum(fn(*args_)) and blocks."""
    if backend == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # one tf.function per case: retracing is expected

        @tf.function(jit_compile=(mode == "xla"), reduce_retracing=True)
        def step(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(fn(q, k, v))
            return tape.gradient(loss, [q, k, v])

        tensors = [tf.convert_to_tensor(x) for x in args_]
        # TensorFlow on CPU returns when the computation is done; .numpy() of a scalar makes sure.
        return lambda: step(*tensors)[0][0, 0, 0, 0].numpy()
    if backend == "jax":
        import jax

        if mode != "xla":
            raise ValueError(f"JAX has no mode {mode!r} (only xla)")
        grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
        arrays = [jax.numpy.asarray(x) for x in args_]
        return lambda: jax.block_until_ready(grad(*arrays))
    raise ValueError(f"Unsupported backend {backend!r} (tensorflow or jax)")


def make_matmul_runner(backend, mode, n):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    if backend == "tensorflow":
        import tensorflow as tf

        f = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=(mode == "xla"))
        ta, tb = tf.constant(a), tf.constant(b)
        return lambda: f(ta, tb)[0, 0].numpy()
    import jax

    f = jax.jit(lambda x, y: x @ y)
    ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
    return lambda: jax.block_until_ready(f(ja, jb))


def is_oom(error):
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, MemoryError) or any(
        s in text for s in ("ResourceExhausted", "RESOURCE_EXHAUSTED", "OOM", "Out of memory")
    )


def compile_runner(factory):
    """(runner, None) after one call (tracing, compilation), or (None, failure status)."""
    try:
        runner = factory()
        runner()
        return runner, None
    except Exception as error:  # noqa: BLE001 - a benchmark reports, it does not crash
        gc.collect()
        status = "OOM" if is_oom(error) else "error"
        return None, {"status": status, "error": f"{type(error).__name__}: {str(error)[:300]}"}


def compile_and_time(factories, *, warmup, repeats):
    """Compiles every factory's runner, then times those that compiled in interleaved rounds.

    Returns {key: status}: {"status": "ok", "time_s" (the min), and time_interleaved's fields},
    or {"status": "OOM" | "error", "error": ...} for a case that failed to compile or to run.
    """
    runners, statuses = {}, {}
    for key, factory in factories.items():
        runner, failure = compile_runner(factory)
        if failure:
            statuses[key] = failure
        else:
            runners[key] = runner
    for key, r in time_interleaved(runners, warmup=warmup, repeats=repeats).items():
        if "error" in r:
            statuses[key] = {"status": "OOM" if is_oom(r["error"]) else "error", **r}
        else:
            statuses[key] = {"status": "ok", "time_s": r["min_s"], **r}
    return statuses


# ---------------------------------------------------------------------------------------------
# One backend


def run_backend(args):
    import keras
    import numpy as np

    from keras_favor.ops import DEFAULT_CHUNK_SIZE, favor_attention, random_features_matrix

    backend = keras.backend.backend()
    modes = [m for m in args.modes if backend == "tensorflow" or m == "xla"]
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    b, n, h, m = args.batch, args.heads, args.dim, args.features
    projection = keras.ops.convert_to_numpy(random_features_matrix(m, h, seed=0))
    _, available = memory_gib()
    budget = args.max_memory_gib or available

    info = run_info(
        batch=b,
        heads=n,
        key_dim=h,
        value_dim=h,
        num_random_features=m,
        feature_map=args.feature_map,
        chunk_size=chunk_size,
        lengths=args.lengths,
        repeats=args.repeats,
        warmup=args.warmup,
        modes=modes,
        matmul_size=args.matmul_size,
    )
    results = {"info": info, "matmul": [], "cases": []}
    print(
        f"# backend={backend} modes={modes} B={b} N={n} H=D={h} M={m} C={chunk_size} "
        f"map={args.feature_map}; times: min over {args.repeats} interleaved rounds",
        flush=True,
    )

    def favor_fn(causal):
        def fn(q, k, v):
            return favor_attention(
                q, k, v, args.feature_map, projection, causal=causal, chunk_size=chunk_size
            )

        return fn

    def exact_fn(q, k, v):
        return keras.ops.dot_product_attention(q, k, v)

    ms = args.matmul_size
    for length in args.lengths:
        rng = np.random.default_rng(length)
        qkv = [rng.standard_normal((b, length, n, h), dtype=np.float32) for _ in range(3)]
        need = exact_memory_gib(b, n, length)
        factories, statuses = {}, {}
        for mode in modes:
            # The reference matmul is timed in the same rounds as the cases it is compared with.
            factories[mode, "matmul"] = functools.partial(make_matmul_runner, backend, mode, ms)
            for name, causal in (("favor", False), ("favor_causal", True)):
                fn = favor_fn(causal)
                factories[mode, name] = functools.partial(make_runner, backend, mode, fn, qkv)
            if args.skip_exact:
                statuses[mode, "exact"] = {"status": "skipped"}
            elif budget is not None and need > budget:
                statuses[mode, "exact"] = {
                    "status": "OOM",
                    "note": f"OOM (estimated {need:.1f} GiB for the score tensors, "
                    f"{budget:.1f} GiB available): not attempted",
                }
            else:
                factories[mode, "exact"] = functools.partial(
                    make_runner, backend, mode, exact_fn, qkv
                )
        statuses.update(compile_and_time(factories, warmup=args.warmup, repeats=args.repeats))

        rates = {}
        for mode in modes:
            r = statuses[mode, "matmul"]
            if r["status"] == "ok":
                r["gflop_per_s"] = 2 * ms**3 / r["time_s"] / 1e9
                rates[mode] = r["gflop_per_s"]
            results["matmul"].append({"length": length, "mode": mode, "size": ms, **r})
        matmul_rate = max(rates.values()) if rates else None
        text = ", ".join(f"{mode} {rate:.0f}" for mode, rate in rates.items())
        print(f"matmul {ms}x{ms} float32 GFLOP/s: {text}", flush=True)
        print_row.header_done = False

        for mode in modes:
            row = {"length": length, "mode": mode, "matmul_gflop_per_s": matmul_rate}
            for name, causal in (("favor", False), ("favor_causal", True)):
                r = statuses[mode, name]
                exact, x3 = favor_flops(b, n, length, h, m, causal, chunk_size)
                r["gflop"], r["gflop_x3"] = exact / 1e9, x3 / 1e9
                if r["status"] == "ok":
                    r["gflop_per_s"] = exact / r["time_s"] / 1e9
                    r["gflop_per_s_x3"] = x3 / r["time_s"] / 1e9
                row[name] = r
            r = statuses[mode, "exact"]
            r["estimated_gib"] = need
            if r["status"] == "ok":
                r["gflop_per_s"] = exact_flops(b, n, length, h) / r["time_s"] / 1e9
            row["exact"] = r
            add_ratios(row, matmul_rate)
            results["cases"].append(row)
            print_row(row, flush=True)
        gc.collect()
    results["summary"] = summarise(results, modes)
    return results


def add_ratios(row, matmul_rate):
    fav, cau, ex = row["favor"], row["favor_causal"], row["exact"]

    def ok(r):
        return r.get("status") == "ok"

    # Wall-clock ratios, and the same from process CPU time, steadier on a shared machine.
    for name, num, den in (
        ("exact_over_favor", ex, fav),
        ("exact_over_favor_causal", ex, cau),
        ("causal_over_non_causal", cau, fav),
    ):
        if ok(num) and ok(den):
            row[name] = num["time_s"] / den["time_s"]
            row[name + "_cpu"] = num["cpu_min_s"] / den["cpu_min_s"]
    if matmul_rate and ok(fav):
        row["favor_fraction_of_matmul"] = fav["gflop_per_s"] / matmul_rate


def _time_cell(r):
    if r.get("status") == "ok":
        return f"{r['time_s'] * 1e3:9.1f}"
    return f"{r.get('status', '?'):>9s}"


def _cell(value, fmt, width):
    return f"{'-':>{width}s}" if value is None else format(value, fmt).rjust(width)


HEADER = (
    f"{'L':>6s} {'mode':>5s} | {'favor ms':>9s} {'causal ms':>9s} {'exact ms':>9s} | "
    f"{'exact/fav':>9s} {'exact/cau':>9s} {'cau/fav':>7s} | {'fav GF/s':>8s} {'%matmul':>7s}"
)


def print_row(row, flush=False):
    if not getattr(print_row, "header_done", False):
        print(HEADER, flush=flush)
        print_row.header_done = True
    fraction = row.get("favor_fraction_of_matmul")
    print(
        f"{row['length']:6d} {row['mode']:>5s} | {_time_cell(row['favor'])} "
        f"{_time_cell(row['favor_causal'])} {_time_cell(row['exact'])} | "
        f"{_cell(row.get('exact_over_favor'), '.1f', 9)} "
        f"{_cell(row.get('exact_over_favor_causal'), '.1f', 9)} "
        f"{_cell(row.get('causal_over_non_causal'), '.2f', 7)} | "
        f"{_cell(row['favor'].get('gflop_per_s'), '.0f', 8)} "
        f"{_cell(None if fraction is None else 100 * fraction, '.0f', 6)}%",
        flush=flush,
    )
    if row["exact"].get("status") not in ("ok", "skipped"):
        print(
            f"{'':15s}exact: {row['exact'].get('note') or row['exact'].get('error')}", flush=flush
        )


def summarise(results, modes):
    """The goals of the project at L = 8192 (or the longest length measured below it)."""
    summary = {}
    for mode in modes:
        rows = [r for r in results["cases"] if r["mode"] == mode]
        if not rows:
            continue
        at = [r for r in rows if r["length"] == 8192] or rows[-1:]
        r = at[0]
        summary[mode] = {
            "length": r["length"],
            "exact_over_favor": r.get("exact_over_favor"),
            "causal_over_non_causal": r.get("causal_over_non_causal"),
            "favor_fraction_of_matmul": r.get("favor_fraction_of_matmul"),
            "exact_over_favor_cpu": r.get("exact_over_favor_cpu"),
            "causal_over_non_causal_cpu": r.get("causal_over_non_causal_cpu"),
            "goal_exact_over_favor_ge_10": _ge(r.get("exact_over_favor"), 10.0),
            "goal_causal_over_non_causal_le_1_5": _le(r.get("causal_over_non_causal"), 1.5),
            "goal_fraction_of_matmul_ge_0_4": _ge(r.get("favor_fraction_of_matmul"), 0.4),
        }
    best = {}
    for length in sorted({r["length"] for r in results["cases"]}):
        rows = [r for r in results["cases"] if r["length"] == length]
        times = {}
        for key in ("favor", "favor_causal", "exact"):
            oks = [(r[key]["time_s"], r["mode"]) for r in rows if r[key].get("status") == "ok"]
            if oks:
                times[key] = min(oks)
        entry = {k: {"time_s": t, "mode": md} for k, (t, md) in times.items()}
        if "favor" in times and "exact" in times:
            entry["exact_over_favor"] = times["exact"][0] / times["favor"][0]
        if "favor" in times and "favor_causal" in times:
            entry["causal_over_non_causal"] = times["favor_causal"][0] / times["favor"][0]
        best[str(length)] = entry
    summary["best_of_modes"] = best
    return summary


def _ge(x, bound):
    return None if x is None else bool(x >= bound)


def _le(x, bound):
    return None if x is None else bool(x <= bound)


def _show(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def print_summary(all_results):
    for backend, res in all_results.items():
        for mode, s in res["summary"].items():
            if mode == "best_of_modes":
                continue
            fraction = s["favor_fraction_of_matmul"]
            print(
                f"\n# {backend} [{mode}] goals at L={s['length']}:\n"
                f"  exact/favor = {_show(s['exact_over_favor'], '.1f')} "
                f"(goal >= 10: {s['goal_exact_over_favor_ge_10']}); "
                f"causal/non-causal = {_show(s['causal_over_non_causal'], '.2f')} "
                f"(goal <= 1.5: {s['goal_causal_over_non_causal_le_1_5']}); "
                f"favor at {_show(None if fraction is None else 100 * fraction, '.0f')}% of "
                f"matmul (goal >= 40 %: {s['goal_fraction_of_matmul_ge_0_4']})\n"
                f"  from CPU time: exact/favor = {_show(s['exact_over_favor_cpu'], '.1f')}, "
                f"causal/non-causal = {_show(s['causal_over_non_causal_cpu'], '.2f')}"
            )
        best = res["summary"]["best_of_modes"].get("8192")
        if best and "exact_over_favor" in best:
            print(
                f"  [best of modes] exact {best['exact']['time_s'] * 1e3:.0f} ms "
                f"({best['exact']['mode']}) / favor {best['favor']['time_s'] * 1e3:.0f} ms "
                f"({best['favor']['mode']}) = {best['exact_over_favor']:.1f}x"
            )


# ---------------------------------------------------------------------------------------------


def _child_argv(args, backend, output):
    argv = [
        sys.executable,
        "-m",
        "benchmarks.ops_speed",
        "--backends",
        backend,
        "--output",
        output,
        "--lengths",
        ",".join(map(str, args.lengths)),
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--dim",
        str(args.dim),
        "--features",
        str(args.features),
        "--feature-map",
        args.feature_map,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--modes",
        ",".join(args.modes),
        "--matmul-size",
        str(args.matmul_size),
    ]
    if args.chunk_size:
        argv += ["--chunk-size", str(args.chunk_size)]
    if args.skip_exact:
        argv.append("--skip-exact")
    if args.max_memory_gib:
        argv += ["--max-memory-gib", str(args.max_memory_gib)]
    return argv


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if len(args.backends) == 1:
        os.environ["KERAS_BACKEND"] = args.backends[0]
        if "keras" in sys.modules:
            import keras

            if keras.backend.backend() != args.backends[0]:
                raise ValueError(
                    f"Keras is already imported with backend {keras.backend.backend()!r}; run "
                    f"`python -m benchmarks.ops_speed --backends {args.backends[0]}`."
                )
        all_results = {args.backends[0]: run_backend(args)}
    else:
        all_results = {}
        for backend in args.backends:  # one process per backend: Keras binds it at import
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "result.json")
                env = dict(os.environ, KERAS_BACKEND=backend)
                subprocess.run(_child_argv(args, backend, out), env=env, check=True)
                with open(out) as f:
                    all_results.update(json.load(f)["backends"])
    print_summary(all_results)

    data = {"benchmark": "ops_speed", "backends": all_results}
    # A run without TensorFlow keeps its own file instead of replacing the TensorFlow figures.
    name = "ops_speed"
    if "tensorflow" not in args.backends:
        name += "_" + "_".join(args.backends)
    path = write_json(name, data, path=args.output)
    print(f"\nwrote {os.path.relpath(path)}")
    return data


if __name__ == "__main__":
    main()
