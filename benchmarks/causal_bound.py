"""How close can chunked causal FAVOR get to non-causal FAVOR? Causal/non-causal time per chunk size.

The goal "causal ≤ 1.5× non-causal" (forward+backward of `favor_attention`, L = 8192) holds at the
layer level but not at the op level (see ops_speed). This script measures, in one run with
interleaved rounds:

  - non-causal `favor_attention`;
  - causal `favor_attention` with chunk C = 32, 64, 128, 256 (128 is the default);
  - the same causal op with its prefix sums over chunks replaced by the identity ("no prefix").
    That output is wrong, but every other product keeps its shape and cost, so its time is a
    lower bound for the chunked algorithm at that C: the in-chunk C×C products and the per-chunk
    states cost at least this much however the prefix sums are done (matmuls, cumsum, a scan).

The ratio of each case to the non-causal op is printed and written to
benchmarks/results/causal_bound.json (a run without TensorFlow: causal_bound_<backend>.json).

    python benchmarks/causal_bound.py                    # L = 8192, graph and XLA modes
    python benchmarks/causal_bound.py --lengths 8192,32768 --chunk-sizes 64,128

The shapes are ops_speed's: B = 1, N = 8, H = D = 64, M = 256, softmax_positive features.
"""

import argparse
import functools
import gc
import os
import sys

# `python benchmarks/causal_bound.py` as well as `python -m benchmarks.causal_bound`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_info, write_json  # noqa: E402

GOAL = 1.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=str, default="8192", help="comma-separated lengths")
    p.add_argument("--chunk-sizes", type=str, default="32,64,128,256")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="key dim H = value dim D")
    p.add_argument("--features", type=int, default=256, help="random features M")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (min kept)")
    p.add_argument("--modes", type=str, default="graph,xla", help="graph and/or xla")
    p.add_argument("--output", type=str, default=None, help="JSON path")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.chunk_sizes = [int(x) for x in args.chunk_sizes.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    return args


def without_prefix_sums(factory):
    """A factory whose runner is traced with the prefix sums over chunks replaced by identity."""
    from keras_favor.ops import linear_attention

    def traced():
        original = linear_attention._exclusive_prefix_sum
        linear_attention._exclusive_prefix_sum = lambda x, num_chunks, reverse=False: x
        try:
            runner = factory()
            runner()  # tracing happens here, with the identity in place
        finally:
            linear_attention._exclusive_prefix_sum = original
        return runner

    return traced


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from benchmarks.ops_speed import compile_and_time, make_runner
    from keras_favor.ops import favor_attention, random_features_matrix

    backend = keras.backend.backend()
    modes = [m for m in args.modes if backend == "tensorflow" or m == "xla"]
    n, h, m = args.heads, args.dim, args.features
    projection = keras.ops.convert_to_numpy(random_features_matrix(m, h, seed=0))
    info = run_info(
        batch=1,
        heads=n,
        key_dim=h,
        value_dim=h,
        num_random_features=m,
        feature_map="softmax_positive",
        lengths=args.lengths,
        chunk_sizes=args.chunk_sizes,
        repeats=args.repeats,
        modes=modes,
    )

    def fn(causal, chunk_size=None):
        def run(q, k, v):
            kw = {"chunk_size": chunk_size} if chunk_size else {}
            return favor_attention(q, k, v, projection_matrix=projection, causal=causal, **kw)

        return run

    rows = []
    print(f"# backend={backend} B=1 N={n} H=D={h} M={m}; min over {args.repeats} rounds")
    print(f"{'L':>6s} {'mode':>5s} {'case':>18s} {'ms':>8s} {'/non-causal':>11s}")
    for length in args.lengths:
        rng = np.random.default_rng(length)
        qkv = [rng.standard_normal((1, length, n, h), dtype=np.float32) for _ in range(3)]
        for mode in modes:
            factories = {
                "non_causal": functools.partial(make_runner, backend, mode, fn(False), qkv)
            }
            for c in args.chunk_sizes:
                base = functools.partial(make_runner, backend, mode, fn(True, c), qkv)
                factories[f"causal_C{c}"] = base
                factories[f"causal_C{c}_no_prefix"] = without_prefix_sums(base)
            statuses = compile_and_time(factories, warmup=1, repeats=args.repeats)
            base_s = statuses["non_causal"].get("time_s")
            for name in factories:
                r = statuses[name]
                row = {"length": length, "mode": mode, "case": name, **r}
                if r["status"] == "ok" and base_s:
                    row["over_non_causal"] = r["time_s"] / base_s
                rows.append(row)
                ratio = row.get("over_non_causal")
                ms = f"{r['time_s'] * 1e3:8.1f}" if r["status"] == "ok" else f"{r['status']:>8s}"
                ratio = f"{ratio:11.2f}" if ratio else f"{'-':>11s}"
                print(f"{length:6d} {mode:>5s} {name:>18s} {ms} {ratio}", flush=True)
            gc.collect()

    summary = {}
    for mode in modes:
        for length in args.lengths:
            sel = [r for r in rows if r["mode"] == mode and r["length"] == length]
            real = [
                r for r in sel if r["case"].startswith("causal") and "no_prefix" not in r["case"]
            ]
            bound = [r for r in sel if r["case"].endswith("no_prefix")]
            best = min(real, key=lambda r: r.get("over_non_causal", float("inf")), default=None)
            low = min(bound, key=lambda r: r.get("over_non_causal", float("inf")), default=None)
            summary[f"{mode}_{length}"] = {
                "best_causal": best and {k: best.get(k) for k in ("case", "over_non_causal")},
                "best_bound": low and {k: low.get(k) for k in ("case", "over_non_causal")},
                "goal": GOAL,
            }
            if best and low and "over_non_causal" in best and "over_non_causal" in low:
                print(
                    f"L={length} {mode}: best causal {best['over_non_causal']:.2f}× "
                    f"({best['case']}); without any prefix cost at best "
                    f"{low['over_non_causal']:.2f}× ({low['case']}); goal ≤ {GOAL}×"
                )
    name = "causal_bound" if backend == "tensorflow" else f"causal_bound_{backend}"
    out = {"benchmark": "causal_bound", "info": info, "rows": rows, "summary": summary}
    print("wrote", write_json(name, out, path=args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
