"""What the exact local window costs: FavorAttention with `local_window=w` against without.

One training step (forward + backward, loss = mean(y²), gradients for the weights and the input)
of one layer on one sequence, B=1, E=512, N=8, key_dim=64, as a `tf.function`, with the learnable
Hedgehog map (F' = 64, the conversion's map) and with FAVOR+ (M=256), causal and bidirectional, at
each length of `--lengths` and each window of `--windows`. Every configuration of one length is
timed in interleaved rounds (`time_interleaved`), so the printed ratio, windowed / plain step time,
comes from one run under the same load. Exact softmax attention (`MultiHeadAttention`) runs in the
same rounds up to `--mha-max-length`, for scale. Results: benchmarks/results/local_window_cost.json.

    python benchmarks/local_window_cost.py                          # L = 1024 4096 16384
    python benchmarks/local_window_cost.py --lengths 512 --repeats 2  # a smoke run

Run on a quiet machine: timings of a shared machine say little; the ratios hold better.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import fmt, ratio, run_info, time_interleaved, write_json  # noqa: E402

EMBED_DIM, NUM_HEADS, KEY_DIM = 512, 8, 64
MAPS = {"hedgehog": {"feature_map": "hedgehog"}, "softmax_positive": {"num_random_features": 256}}


def step_fn(layer, x, causal):
    """A compiled training step of `layer` on `x`: returns a callable that blocks until done."""
    import tensorflow as tf

    layer(x, x, use_causal_mask=causal)  # build

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, x, use_causal_mask=causal)
            loss = tf.reduce_mean(tf.square(y))
        return tape.gradient(loss, [x, *layer.trainable_weights])

    return lambda: [g.numpy() for g in step(x)]


def measure(length, windows, causal, repeats, mha):
    import keras
    import numpy as np

    from keras_favor import FavorAttention

    keras.utils.set_random_seed(0)
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=(1, length, EMBED_DIM)).astype("float32")
    )
    fns = {}
    for name, options in MAPS.items():
        for window in (None, *windows):
            layer = FavorAttention(NUM_HEADS, KEY_DIM, seed=0, local_window=window, **options)
            fns[f"{name}/{window}"] = step_fn(layer, x, causal)
    if mha:
        fns["mha"] = step_fn(keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM), x, causal)
    return time_interleaved(fns, warmup=1, repeats=repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mha-max-length", type=int, default=4096)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'L':>6} {'causal':>6} {'map':>16} {'window':>6} {'step (s)':>9} {'vs plain':>9}")
    for length in args.lengths:
        for causal in (False, True):
            times = measure(
                length, args.windows, causal, args.repeats, length <= args.mha_max_length
            )
            for name in (*MAPS, "mha"):
                for window in (None, *args.windows) if name != "mha" else (None,):
                    key = name if name == "mha" else f"{name}/{window}"
                    if key not in times:
                        continue
                    plain = times.get("mha" if name == "mha" else f"{name}/None", {})
                    step = times[key].get("min_s")
                    row = {
                        "length": length,
                        "causal": causal,
                        "map": name,
                        "local_window": window,
                        "step_min_s": step,
                        "vs_plain": ratio(step, plain.get("min_s")),
                        "error": times[key].get("error"),
                        "timing": times[key],
                    }
                    rows.append(row)
                    print(
                        f"{length:>6} {causal!s:>6} {name:>16} {fmt(window, 'd', '-'):>6} "
                        f"{fmt(step, '.4f'):>9} {fmt(row['vs_plain'], '.2f'):>9}",
                        flush=True,
                    )
    info = run_info(
        lengths=args.lengths,
        windows=args.windows,
        repeats=args.repeats,
        embed_dim=EMBED_DIM,
        num_heads=NUM_HEADS,
        key_dim=KEY_DIM,
        maps=MAPS,
        timing="min over interleaved rounds of one training step",
    )
    path = write_json("local_window_cost", {"run": info, "rows": rows})
    print(f"Wrote {path}")
    return rows


if __name__ == "__main__":
    main()
