"""Long context options of the quickstart language model, trained at one equal budget.

Each configuration trains `examples/quickstart.py`'s byte-level model (its `build_model`, corpus
and training loop) for the same number of optimizer steps on the same number of bytes per step:

- `baseline`: the quickstart as it was (RoPE, no decay, no convolution, 256-byte windows);
- `decay`: a per-head decay of the causal state, `decay_rates(num_heads, longest_reach=window)`;
- `decay_conv`: decay and a causal depthwise convolution of kernel 4 before the projections;
- `decay_conv_nope`: the same without rotary position embeddings;
- `decay_conv_1024`: decay and convolution on 1024-byte windows (4x fewer windows per step, as
  many bytes: FAVOR's cost per byte does not grow with the window), reach capped at 1024;
- `decay_conv_reach64`, `decay_conv_1024_reach256`: reaches 16..64 on 256-byte windows and
  32..256 on 1024-byte windows: every head forgets well inside the training window.

For each: validation bits per byte on 256-byte windows, then on validation sequences of 8192 bytes
by span (0-256, 256-1024, 1024-4096, 4096-8192) against the same bytes cut into 256-byte windows
(ratio < 1: the context helps), and the training wall time. Writes
benchmarks/results/long_context.json and long_context.png (loss by position).

    python benchmarks/long_context.py --steps 300
    python benchmarks/long_context.py --configs baseline decay_conv --merge
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, run_info, write_json  # noqa: E402

WINDOW = 256
CURVE_BIN = 64  # the stored loss-by-position curves are means over bins of this many bytes
CONFIGS = {
    "baseline": dict(sequence_length=256),
    "decay": dict(sequence_length=256, decay=True),
    "decay_conv": dict(sequence_length=256, decay=True, causal_conv_kernel_size=4),
    "decay_conv_nope": dict(
        sequence_length=256, decay=True, causal_conv_kernel_size=4, use_rotary_embedding=False
    ),
    "decay_conv_1024": dict(sequence_length=1024, decay=True, causal_conv_kernel_size=4),
    # Reaches well inside the training window: every head's state is at its steady size long
    # before the window ends, so that longer sequences look like the training ones.
    "decay_conv_reach64": dict(sequence_length=256, decay=(16, 64), causal_conv_kernel_size=4),
    "decay_conv_1024_reach256": dict(
        sequence_length=1024, decay=(32, 256), causal_conv_kernel_size=4
    ),
    "decay_conv_reach64_nope": dict(
        sequence_length=256, decay=(16, 64), causal_conv_kernel_size=4, use_rotary_embedding=False
    ),
}


def run_config(name, steps, bytes_per_step, long_length, num_sequences, seed, verbose):
    """Trains and evaluates one configuration; returns its results (curves included)."""
    import keras

    from examples import data, quickstart
    from keras_favor.ops import decay_rates

    options = dict(CONFIGS[name])
    sequence_length = options.pop("sequence_length")
    num_heads = 4
    decay = options.pop("decay", None)
    if decay:
        shortest, longest = (32, sequence_length) if decay is True else decay
        options["decay"] = decay_rates(num_heads, shortest, longest)
    keras.utils.set_random_seed(seed)
    corpus = data.load_corpus()
    model = quickstart.build_model(num_heads=num_heads, seed=seed, **options)
    start = time.perf_counter()
    history, _ = quickstart.train(
        model,
        corpus,
        steps,
        bytes_per_step // sequence_length,
        sequence_length,
        epochs=1,
        redraw_every=max(1, steps * 4 // 15),  # 3 redraws, at 4/15 of the steps and multiples
        validation_windows=64,
        seed=seed,
        verbose=verbose,
    )
    train_seconds = time.perf_counter() - start
    # 256-byte validation windows (the training windows' validation is on their own length).
    val_x, val_y = data.validation_windows(corpus.validation, WINDOW, 64)
    val_loss = data.cross_entropy(model.predict(val_x, batch_size=16, verbose=0), val_y)
    full, windowed = quickstart.position_losses(
        model, corpus, long_length, WINDOW, num_sequences=num_sequences
    )
    rows = quickstart.span_table(full, windowed)
    return {
        "options": {"sequence_length": sequence_length, **options},
        "train_seconds": train_seconds,
        "train_loss_last_epoch": history["loss"][-1],
        "validation_bits_per_byte_256": data.bits_per_byte(val_loss),
        "spans": [
            {"start": s, "end": e, "full": f, "windowed": w, "ratio": r} for s, e, f, w, r in rows
        ],
        "curve_full": binned(full),
        "curve_windowed": binned(windowed),
    }


def binned(curve):
    """Means of `curve` over consecutive `CURVE_BIN`-position bins, rounded, as a list."""
    bins = curve[: curve.size // CURVE_BIN * CURVE_BIN].reshape(-1, CURVE_BIN).mean(axis=1)
    return [round(float(v), 4) for v in bins]


def goals(result):
    """The issue's goals for one configuration: context helps, flat or falling, <= 2.3 (2.43)."""
    spans = result["spans"][:-1]
    whole = result["spans"][-1]
    return {
        "beats_windows": whole["full"] < whole["windowed"],
        "falls_or_flat": all(b["full"] <= a["full"] + 0.02 for a, b in zip(spans, spans[1:])),
        "helps_at_every_span": all(s["ratio"] <= 1 for s in spans),
        "at_most_2.3": whole["full"] <= 2.3,
        "below_2.43": whole["full"] < 2.43,
    }


def print_table(results):
    names = list(results)
    print(
        f"\n{'config':<17} {'train s':>8} {'val256':>7} "
        + " ".join(f"{s['start']}-{s['end']:<5}" for s in results[names[0]]["spans"])
    )
    for name in names:
        r = results[name]
        cells = " ".join(
            f"{s['full']:.2f}/{s['windowed']:.2f}={s['ratio']:.2f}".ljust(
                len(f"{s['start']}-{s['end']:<5}")
            )
            for s in r["spans"]
        )
        print(
            f"{name:<17} {r['train_seconds']:8.0f} {r['validation_bits_per_byte_256']:7.3f} "
            + cells
        )
    print(
        "(each span: bits/byte with the whole sequence as context / cut into 256-byte windows "
        "= ratio; < 1: the context helps)"
    )
    for name in names:
        print(f"{name:<17} goals: {results[name]['goals']}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(8, 4.5))
    smooth = WINDOW // CURVE_BIN
    kernel = np.ones(smooth) / smooth

    def line(curve, *args, **kwargs):
        curve = np.convolve(curve, kernel, mode="valid")
        axes.plot((np.arange(curve.size) + smooth) * CURVE_BIN, curve, *args, **kwargs)

    for name, result in results.items():
        line(result["curve_full"], label=name)
    first = next(iter(results))
    line(results[first]["curve_windowed"], "k:", label=f"{first}, cut into {WINDOW}-byte windows")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("position (bytes)")
    axes.set_ylabel(f"bits per byte (mean over the last {WINDOW} positions)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per config")
    parser.add_argument("--bytes-per-step", type=int, default=16 * 256)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--long-length", type=int, default=8192)
    parser.add_argument("--num-sequences", type=int, default=4, help="8192-byte sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--merge", action="store_true", help="keep other configs' results")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "long_context.json"))
    args = parser.parse_args(argv)

    results = {}
    if args.merge and os.path.isfile(args.output):
        with open(args.output) as f:
            results = json.load(f)["results"]
    for name in args.configs:
        print(f"== {name}: {CONFIGS[name]}", flush=True)
        result = run_config(
            name,
            args.steps,
            args.bytes_per_step,
            args.long_length,
            args.num_sequences,
            args.seed,
            args.verbose,
        )
        result["goals"] = goals(result)
        results[name] = result
        info = run_info(
            steps=args.steps,
            bytes_per_step=args.bytes_per_step,
            long_length=args.long_length,
            num_sequences=args.num_sequences,
            seed=args.seed,
            curve_bin=CURVE_BIN,
        )
        write_json(os.path.basename(args.output)[:-5], {**info, "results": results}, args.output)
        print_table({name: result})
    print_table(results)
    plot(results, args.output[:-5] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
