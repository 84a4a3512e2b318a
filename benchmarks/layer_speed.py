"""FavorAttention vs keras.layers.MultiHeadAttention: training speed, causal cost, longest length.

Speed (default): forward + backward (loss = mean(y²); gradients for the weights and the input) of
one layer on one sequence, B=1, E=512, N=8, key_dim=64, M=256, at L = 1024, 4096, 8192, each layer
as a `tf.function` under each Keras dtype policy of `--policy` (float32, mixed_bfloat16,
mixed_float16): MultiHeadAttention without XLA (under XLA it runs out of memory at 8192),
FavorAttention without and with XLA (`jit_compile=True`), and the floor: the same four projections
with attention replaced by the identity (no attention layer trains faster; MHA/floor bounds any
speed-up), and "products": the floor plus FAVOR's matrix products alone (ωᵀq, ωᵀk, V1ᵀφ(K),
φ(Q)·(V1ᵀφ(K)) and their gradients, no element-wise work), whose time over the floor is the least
FAVOR / floor that any layer computing those products can reach on this machine. Prints the median
times, MHA / FAVOR and FAVOR / floor, with the faster FAVOR mode, and products / floor.
Goals at 8192 under mixed_bfloat16: FAVOR ≤ 1.5× the floor and MHA / FAVOR ≥ 10×.

Causal cost (`--causal-ratio`): FAVOR's causal / non-causal step time at L = 1024 ... 262144 under
each policy, without XLA (what `fit` runs on a CPU-only machine; `--xla` for the compiled step).
Goal: ≤ 1.25× at every length, under float32 and mixed_bfloat16.

Longest length (`--max-length`): for MultiHeadAttention and FavorAttention (XLA), non-causal and
causal, doubles L from `--start-length` (16384) up to `--stop-length` (1048576) until a training
step fails, and records the peak memory (RSS) of each step (if the start length already fails, it
halves instead, to report the longest length that works).

Every measurement runs in a child process whose address space is capped (`--memory-limit-gb`,
default 20, with `RLIMIT_AS`), so running out of memory ends that trial, not the run or the machine.
The peak RSS of each child comes from `wait4`. Results: benchmarks/results/layer_speed.json, with
a "speed", a "causal_ratio" and a "max_length" section (each run replaces its own).

    python benchmarks/layer_speed.py --policy float32 mixed_bfloat16    # speed, L = 1024 4096 8192
    python benchmarks/layer_speed.py --lengths 512 1024 --repeats 2   # a quick smoke run
    python benchmarks/layer_speed.py --causal-ratio --policy float32 mixed_bfloat16
    python benchmarks/layer_speed.py --max-length             # longest trainable L (slow)
    python benchmarks/layer_speed.py --max-length --configs favor_xla --start-length 262144 \
        --stop-length 262144                                  # memory at one length
    python benchmarks/layer_speed.py --causal                 # speed of causal attention too

Run on a quiet machine: timings of a shared machine say little.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    add_trial_arguments,
    child_trial_main,
    run_in_capped_child,
    run_info,
    write_json,
)

EMBED_DIM = 512
NUM_HEADS = 8
KEY_DIM = 64
NUM_RANDOM_FEATURES = 256

SPEED_LENGTHS = (1024, 4096, 8192)
CAUSAL_RATIO_LENGTHS = (1024, 4096, 16384, 65536, 262144)

# (name, layer, xla): the speed run's configurations. "floor" is the same four projections with
# attention replaced by the identity: no attention layer can train faster than that.
SPEED_CONFIGS = (
    ("mha", "mha", False),
    ("favor", "favor", False),
    ("favor_xla", "favor", True),
    ("floor", "floor", False),
    ("matmuls", "matmuls", False),
)
# The longest-length run: MHA without XLA (its best mode), FAVOR with and without XLA (XLA packs
# the causal step's buffers less tightly on CPU).
MAX_LENGTH_CONFIGS = (
    ("mha", "mha", False),
    ("favor_xla", "favor", True),
    ("favor", "favor", False),
)


# ----------------------------------------------------------------------------------------------
# One trial (in a child process).


def run_trial(layer_kind, length, causal, xla, repeats, policy="float32", seed=0):
    """Builds one layer under the dtype `policy`, times `repeats` training steps after a first
    (compiling) one.

    Returns a JSON-able dict: ok, first_step_s, median_s, min_s, times_s.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("layer_speed.py needs KERAS_BACKEND=tensorflow")
    from keras_favor import FavorAttention

    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(seed)
    if layer_kind == "mha":
        layer = keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)
    elif layer_kind == "floor":

        class Floor(FavorAttention):
            def call(self, query, value, key=None, use_causal_mask=False, training=None):
                q, k = self.query_dense(query), self.key_dense(value)
                v = self.value_dense(value)
                return self.output_dense(v + 0.0 * (q + k))  # every projection in the gradient

        layer = Floor(NUM_HEADS, KEY_DIM, feature_map="elu")
    elif layer_kind == "matmuls":
        from keras import ops

        class FloorAndProducts(FavorAttention):
            # The floor plus FAVOR's matrix products and nothing else: ωᵀq, ωᵀk, V1ᵀφ(K) and
            # φ(Q)·(V1ᵀφ(K)) in the compute dtype, their gradients by autodiff (the same six
            # backward products as FAVOR's). No exp, stabiliser or normaliser: a lower bound of
            # any FAVOR layer's time that computes these products.
            def call(self, query, value, key=None, use_causal_mask=False, training=None):
                q, k = self.query_dense(query), self.key_dense(value)
                v = self.value_dense(value)
                w = ops.transpose(ops.cast(self.projection_matrix, q.dtype))  # (H, M)
                qh, kh, vh = (ops.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))
                v1 = ops.concatenate([vh, ops.ones_like(vh[..., :1])], axis=-1)
                kv = ops.einsum("bnsd,bnsf->bndf", v1, ops.matmul(kh, w))
                out = ops.einsum("bntf,bndf->bntd", ops.matmul(qh, w), kv)
                out = ops.split(out, [out.shape[-1] - 1], axis=-1)[0]
                return self.output_dense(ops.transpose(out, (0, 2, 1, 3)))

        layer = FloorAndProducts(
            NUM_HEADS, KEY_DIM, num_random_features=NUM_RANDOM_FEATURES, seed=seed
        )
    else:
        layer = FavorAttention(
            NUM_HEADS, KEY_DIM, num_random_features=NUM_RANDOM_FEATURES, seed=seed
        )
    x = tf.constant(
        np.random.default_rng(seed).normal(scale=0.5, size=(1, length, EMBED_DIM)).astype("float32")
    )
    layer(x[:, :8], x[:, :8], use_causal_mask=causal)  # build

    def train_step(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = layer(inputs, inputs, use_causal_mask=causal, training=True)
            loss = tf.reduce_mean(tf.square(tf.cast(y, tf.float32)))
        grads = tape.gradient(loss, layer.trainable_variables + [inputs])
        # One scalar depending on every gradient, so that nothing is pruned.
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

    step = tf.function(train_step, jit_compile=xla)
    start = time.perf_counter()
    step(x).numpy()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x).numpy()
        times.append(time.perf_counter() - start)
    return {
        "ok": True,
        "first_step_s": first,
        "median_s": float(np.median(times)) if times else None,
        "min_s": min(times) if times else None,
        "times_s": times,
    }


def trial(
    layer_kind, length, *, causal, xla, repeats, memory_limit_gb, timeout_s, policy="float32"
):
    """Runs one trial in a capped child process; adds the child's peak RSS and exit status."""
    spec = dict(
        layer_kind=layer_kind, length=length, causal=causal, xla=xla, repeats=repeats, policy=policy
    )
    result = run_in_capped_child(
        __file__,
        spec,
        memory_limit_gb=memory_limit_gb,
        timeout_s=timeout_s,
        env={"KERAS_BACKEND": "tensorflow"},
        poll_s=0.2,
    )
    result.update(layer=layer_kind, length=length, causal=causal, xla=xla, policy=policy)
    return result


def _fmt_ms(result):
    if result is None:
        return "-"
    if not result["ok"]:
        return result["failure"].upper()
    return f"{1000 * result['median_s']:.0f}"


def _ratio(a, b):
    """a / b of two trials' median times, or None when either failed."""
    return a["median_s"] / b["median_s"] if a["ok"] and b["ok"] else None


def _fmt_ratio(r, suffix="x"):
    return f"{r:.2f}{suffix}" if r else "-"


def _best_favor(row):
    """The faster of FAVOR without and with XLA (both are what a user can pick)."""
    ok = [row[n] for n in ("favor", "favor_xla") if row[n]["ok"]]
    return min(ok, key=lambda r: r["median_s"]) if ok else row["favor"]


def speed(args):
    rows = []
    for policy in args.policy:
        for causal in (False, True) if args.causal else (False,):
            for length in args.lengths:
                row = {"length": length, "causal": causal, "policy": policy}
                for name, kind, xla in SPEED_CONFIGS:
                    print(f"  {policy} L={length} causal={causal} {name} ...", flush=True)
                    row[name] = trial(
                        kind,
                        length,
                        causal=causal,
                        xla=xla,
                        repeats=args.repeats,
                        memory_limit_gb=args.memory_limit_gb,
                        timeout_s=args.trial_timeout,
                        policy=policy,
                    )
                mha, floor = row["mha"], row["floor"]
                for name in ("favor", "favor_xla"):
                    row[f"speedup_{name}"] = _ratio(mha, row[name])
                    row[f"{name}_over_floor"] = _ratio(row[name], floor)
                best = _best_favor(row)
                row["best_favor"] = "favor_xla" if best is row["favor_xla"] else "favor"
                row["speedup_best"] = _ratio(mha, best)
                row["best_over_floor"] = _ratio(best, floor)
                # The best MHA/FAVOR ratio any attention could reach here: MHA over the floor;
                # and the least FAVOR/floor any layer computing FAVOR's products could reach.
                row["speedup_bound"] = _ratio(mha, floor)
                row["matmuls_over_floor"] = _ratio(row["matmuls"], floor)
                rows.append(row)

    header = (
        f"{'policy':>14} {'L':>6} {'causal':>6} | {'MHA ms':>8} {'FAVOR ms':>9} "
        f"{'FAVOR XLA ms':>13} {'floor ms':>9} | {'MHA/FAVOR':>9} {'FAVOR/floor':>11} "
        f"{'MHA/floor':>9} {'products/floor':>14} | {'peak GiB (MHA, FAVOR, XLA, floor)':>34}"
    )
    print(
        "\nForward + backward, B=1, E=512, N=8, key_dim=64, M=256 (median of repeats); "
        "MHA/FAVOR and FAVOR/floor use the faster FAVOR (plain or XLA)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        peaks = ", ".join(f"{row[n]['peak_rss_gib']:.1f}" for n, _, _ in SPEED_CONFIGS[:4])
        print(
            f"{row['policy']:>14} {row['length']:>6} {str(row['causal']):>6} | "
            f"{_fmt_ms(row['mha']):>8} {_fmt_ms(row['favor']):>9} {_fmt_ms(row['favor_xla']):>13} "
            f"{_fmt_ms(row['floor']):>9} | {_fmt_ratio(row['speedup_best']):>9} "
            f"{_fmt_ratio(row['best_over_floor']):>11} {_fmt_ratio(row['speedup_bound']):>9} "
            f"{_fmt_ratio(row['matmuls_over_floor']):>14} | "
            f"{peaks:>34}"
        )
    return rows


def causal_ratio(args):
    """FAVOR causal / non-causal training-step time per length and policy.

    Without XLA: the mode Keras's `fit` uses on a CPU-only TensorFlow machine
    (`jit_compile="auto"` turns XLA off there); `--xla` measures the compiled step instead.
    """
    rows = []
    for policy in args.policy:
        for length in args.lengths:
            row = {"length": length, "policy": policy, "xla": args.xla}
            for causal in (False, True):
                print(f"  {policy} L={length} causal={causal} xla={args.xla} ...", flush=True)
                row["causal" if causal else "non_causal"] = trial(
                    "favor",
                    length,
                    causal=causal,
                    xla=args.xla,
                    repeats=args.repeats,
                    memory_limit_gb=args.memory_limit_gb,
                    timeout_s=args.trial_timeout,
                    policy=policy,
                )
            row["ratio"] = _ratio(row["causal"], row["non_causal"])
            rows.append(row)
    header = f"{'policy':>14} {'L':>7} | {'non-causal ms':>13} {'causal ms':>10} | {'ratio':>6}"
    print(
        "\nFAVOR causal / non-causal, forward + backward, B=1, E=512, N=8, key_dim=64, M=256"
        f"{', XLA' if args.xla else ''} (goal: ratio ≤ 1.25 at every length)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['policy']:>14} {row['length']:>7} | {_fmt_ms(row['non_causal']):>13} "
            f"{_fmt_ms(row['causal']):>10} | {_fmt_ratio(row['ratio']):>6}"
        )
    return rows


def _search(kind, *, causal, xla, args):
    """Doubling from the start length until a failure (or the stop length); halving first if
    the start length fails. Returns (longest length that trained or None, trials)."""
    trials = []

    def attempt(length):
        print(f"  {kind} xla={xla} causal={causal} L={length} ...", end=" ", flush=True)
        result = trial(
            kind,
            length,
            causal=causal,
            xla=xla,
            repeats=1,
            memory_limit_gb=args.memory_limit_gb,
            timeout_s=args.trial_timeout,
        )
        status = f"{result['median_s']:.2f} s" if result["ok"] else result["failure"]
        print(f"{status}, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
        trials.append(result)
        return result["ok"]

    longest, length = None, args.start_length
    if attempt(length):
        longest = length
        while length * 2 <= args.stop_length:
            length *= 2
            if not attempt(length):
                break
            longest = length
    else:
        while length // 2 >= args.min_length:
            length //= 2
            if attempt(length):
                longest = length
                break
    return longest, trials


def max_length(args):
    results = []
    configs = [c for c in MAX_LENGTH_CONFIGS if not args.configs or c[0] in args.configs]
    for causal in (False, True):
        for name, kind, xla in configs:
            longest, trials = _search(kind, causal=causal, xla=xla, args=args)
            best = next((t for t in trials if t["ok"] and t["length"] == longest), None)
            results.append(
                {
                    "config": name,
                    "causal": causal,
                    "longest_length": longest,
                    "peak_rss_gib_at_longest": best["peak_rss_gib"] if best else None,
                    "step_s_at_longest": best["median_s"] if best else None,
                    "trials": trials,
                }
            )
    print(f"\nLongest trainable L (B=1, memory cap {args.memory_limit_gb} GiB, powers of two)")
    print(f"{'config':>10} {'causal':>6} | {'longest L':>10} {'peak GiB':>9} {'step s':>8}")
    for r in results:
        longest = r["longest_length"] or "none"
        peak = f"{r['peak_rss_gib_at_longest']:.2f}" if r["longest_length"] else "-"
        step = f"{r['step_s_at_longest']:.2f}" if r["longest_length"] else "-"
        capped = " (stop length)" if r["longest_length"] == args.stop_length else ""
        print(
            f"{r['config']:>10} {str(r['causal']):>6} | {longest:>10} {peak:>9} {step:>8}{capped}"
        )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--causal", action="store_true", help="also time causal attention")
    parser.add_argument(
        "--policy",
        nargs="+",
        default=["float32"],
        choices=["float32", "mixed_bfloat16", "mixed_float16"],
        help="Keras dtype policies to measure, every layer under each (default: float32)",
    )
    parser.add_argument(
        "--causal-ratio",
        action="store_true",
        help="FAVOR causal / non-causal per length and policy (lengths default to 1024..262144)",
    )
    parser.add_argument("--xla", action="store_true", help="--causal-ratio: the XLA step")
    parser.add_argument("--max-length", action="store_true", help="find the longest trainable L")
    parser.add_argument("--start-length", type=int, default=16384)
    parser.add_argument("--stop-length", type=int, default=1048576)
    parser.add_argument("--min-length", type=int, default=1024)
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=[c[0] for c in MAX_LENGTH_CONFIGS],
        help="--max-length: only these layers (default: all)",
    )
    add_trial_arguments(parser, trial_timeout_s=1800.0)
    args = parser.parse_args(argv)
    if args._trial:
        child_trial_main(args._trial, run_trial)
        return

    settings = dict(
        batch_size=1,
        embed_dim=EMBED_DIM,
        num_heads=NUM_HEADS,
        key_dim=KEY_DIM,
        num_random_features=NUM_RANDOM_FEATURES,
        memory_limit_gib=args.memory_limit_gb,
        measured="tf.function train step: forward + backward (weights and input), loss mean(y^2)",
    )
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # One file, one section per mode: a run replaces its own section and keeps the other.
    try:
        with open(os.path.join(RESULTS_DIR, "layer_speed.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    if args.max_length:
        settings.update(start_length=args.start_length, stop_length=args.stop_length)
        results = max_length(args)
        if args.configs and "max_length" in data:
            # Keep the other layers' results of the previous run (with the date they were taken).
            others = [r for r in data["max_length"]["results"] if r["config"] not in args.configs]
            for r in others:
                r.setdefault("date", data["max_length"].get("date"))
            results = others + results
        data["max_length"] = {**run_info(**settings), "results": results}
    elif args.causal_ratio:
        args.lengths = args.lengths or list(CAUSAL_RATIO_LENGTHS)
        settings.update(
            lengths=args.lengths, repeats=args.repeats, policies=args.policy, xla=args.xla
        )
        rows = causal_ratio(args)
        data["causal_ratio"] = {**run_info(**settings), "results": rows}
    else:
        args.lengths = args.lengths or list(SPEED_LENGTHS)
        settings.update(
            lengths=args.lengths, repeats=args.repeats, causal=args.causal, policies=args.policy
        )
        rows = speed(args)
        data["speed"] = {**run_info(**settings), "results": rows}
    path = write_json("layer_speed", data)
    print(f"\nwrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
