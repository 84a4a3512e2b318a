"""Time and memory vs sequence length: the Performer paper's Figure 3, on this machine.

For each attention variant, forward and forward+backward time of one attention layer (B=1, E=512,
N=8, key_dim=64, M=256) at doubling lengths, and the peak memory (RSS) of the process:

- `FavorAttention` with every feature map, non-causal and causal, under XLA (`jit_compile=True`);
- `keras.layers.MultiHeadAttention` (without XLA: under XLA it runs out of memory sooner);
- `keras.ops.dot_product_attention` behind the same four projections (`dpa`);
- the no-attention floor: the same projections with attention replaced by the identity (`identity`).

Each variant runs in its own child process with a capped address space; it goes through the lengths
in increasing order and stops at the first that fails (out of memory or over the time limit), so the
last length listed is the longest that variant runs. Results: benchmarks/results/scaling.json and
scaling.png (log-log).

    python benchmarks/scaling.py                 # L = 512 .. 16384
    python benchmarks/scaling.py --quick         # L = 256 .. 2048, few variants
    python -m benchmarks scaling --max-length 65536
    python benchmarks/scaling.py --variants favor:elu:full --merge   # rerun one, keep the rest
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, run_info, write_json  # noqa: E402

EMBED_DIM, NUM_HEADS, KEY_DIM, NUM_RANDOM_FEATURES = 512, 8, 64, 256
FEATURE_MAPS = (
    "softmax_positive",
    "softmax_hyperbolic",
    "softmax_optimal",
    "softmax_trig",
    "relu",
    "elu",
)
GIB = 2**30
_TF_LOG_LINE = re.compile(r"^[IWE]\d{4} |^WARNING: All log messages")


def variants(quick):
    maps = ("softmax_positive", "elu") if quick else FEATURE_MAPS
    out = []
    for causal in (False, True):
        out += [f"favor:{m}:{'causal' if causal else 'full'}" for m in maps]
        out += [f"mha:{'causal' if causal else 'full'}", f"dpa:{'causal' if causal else 'full'}"]
    return out + ["identity:full"]


def _build(kind, feature_map, causal, seed=0):
    import keras

    from keras_favor import FavorAttention

    if kind == "favor":
        return FavorAttention(
            NUM_HEADS,
            KEY_DIM,
            feature_map=feature_map,
            num_random_features=NUM_RANDOM_FEATURES,
            seed=seed,
        )
    if kind == "mha":
        return keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)

    class ProjectedAttention(FavorAttention):
        """FavorAttention's projections around exact attention (dpa) or no attention (identity)."""

        def call(self, query, value, key=None, use_causal_mask=False, training=None):
            q = self.query_dense(query)  # (B, T, N, H)
            k = self.key_dense(value)
            v = self.value_dense(value)  # (B, S, N, D)
            if kind == "dpa":
                out = keras.ops.dot_product_attention(q, k, v, is_causal=use_causal_mask)
            else:
                out = v + 0.0 * (q + k)  # keeps the projections in the gradient
            return self.output_dense(out)

    return ProjectedAttention(NUM_HEADS, KEY_DIM, feature_map="elu")


def _child(spec):
    """Runs one variant over increasing lengths; appends one JSON line per length to spec['out']."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    kind, feature_map, mode = (spec["variant"].split(":") + [None])[:3]
    if kind != "favor":
        mode, feature_map = feature_map, None
    causal = mode == "causal"
    xla = kind == "favor"
    layer = _build(kind, feature_map, causal)
    x0 = tf.zeros((1, 8, EMBED_DIM))
    layer(x0, x0, use_causal_mask=causal)

    def forward(x):
        return tf.reduce_mean(tf.square(layer(x, x, use_causal_mask=causal)))

    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = forward(x)
        grads = tape.gradient(loss, layer.trainable_variables + [x])
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

    fns = {
        "forward": tf.function(forward, jit_compile=xla),
        "forward_backward": tf.function(forward_backward, jit_compile=xla),
    }
    for length in spec["lengths"]:
        x = tf.constant(
            np.random.default_rng(0).normal(scale=0.5, size=(1, length, EMBED_DIM)), tf.float32
        )
        row = {"variant": spec["variant"], "length": length}
        for name, fn in fns.items():
            fn(x).numpy()  # compile / warm up
            times = []
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                fn(x).numpy()
                times.append(time.perf_counter() - start)
            row[f"{name}_s"] = float(np.median(times))
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        with open(spec["out"], "a") as f:
            f.write(json.dumps(row) + "\n")


def run_variant(variant, lengths, repeats, memory_limit_gb, timeout_s):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.jsonl")
        spec = {"variant": variant, "lengths": lengths, "repeats": repeats, "out": out}
        limit = int(memory_limit_gb * GIB)

        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                env=env,
                preexec_fn=cap,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            oom = re.search(
                r"ResourceExhausted|OOM|out of memory|bad_alloc|MemoryError", proc.stderr
            )
            status = "ok" if proc.returncode == 0 else "stopped (out of memory or crash)"
            if proc.returncode and oom:
                status = "stopped (out of memory)"
            # The last line that is not one of TensorFlow's own log lines ("I0000 ...").
            lines = [x for x in proc.stderr.strip().splitlines() if not _TF_LOG_LINE.match(x)]
            detail = lines[-1:] if proc.returncode else []
        except subprocess.TimeoutExpired:
            status, detail = "stopped (time limit)", []
        rows = []
        if os.path.exists(out):
            with open(out) as f:
                rows = [json.loads(line) for line in f]
    done = {r["length"] for r in rows}
    failed = [n for n in lengths if n not in done]
    if failed and detail:
        status = f"{status}: {detail[0][-200:]}"
    return rows, (status if failed else "ok"), (failed[0] if failed else None)


# One colour per attention (feature map or baseline); solid = non-causal, dashed = causal.
_COLOURS = {
    "softmax_positive": "tab:blue",
    "softmax_hyperbolic": "tab:cyan",
    "softmax_optimal": "tab:purple",
    "softmax_trig": "tab:olive",
    "relu": "tab:green",
    "elu": "tab:pink",
    "mha": "tab:red",
    "dpa": "tab:orange",
    "identity": "black",
}


def _style(variant):
    parts = variant.split(":")
    kind = parts[1] if parts[0] == "favor" else parts[0]
    label = (
        f"FAVOR {kind}"
        if parts[0] == "favor"
        else {"mha": "MHA", "dpa": "dot_product_attn"}.get(kind, "no attention (floor)")
    )
    causal = parts[-1] == "causal"
    return dict(
        color=_COLOURS.get(kind, "gray"),
        linestyle="--" if causal else "-",
        linewidth=2.2 if parts[0] != "favor" else 1.3,
        marker="o" if parts[0] != "favor" else ".",
        markersize=4,
        label=label + (" (causal)" if causal else ""),
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for variant in sorted({r["variant"] for r in rows}):
        sel = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["length"])
        lengths = [r["length"] for r in sel]
        for ax, key in zip(axes, ("forward_s", "forward_backward_s", "peak_rss_gib")):
            ax.loglog(lengths, [r[key] for r in sel], **_style(variant))
    titles = ("forward, s", "forward + backward, s", "peak RSS of the process, GiB")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("sequence length L (B=1)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(
        f"One attention layer, B=1, E={EMBED_DIM}, N={NUM_HEADS}, key_dim={KEY_DIM}, "
        f"M={NUM_RANDOM_FEATURES}; FAVOR under XLA; MHA and dot_product_attention stop where "
        "they run out of memory"
    )
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, two feature maps")
    parser.add_argument("--min-length", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per variant")
    parser.add_argument("--variants", nargs="*", help="e.g. favor:relu:causal mha:full")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other variants of the existing scaling.json (rerun a few variants)",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return _child(json.loads(args._child))
    lo, hi = (256, 2048) if args.quick else (args.min_length, args.max_length)
    lengths = []
    while lo <= hi:
        lengths.append(lo)
        lo *= 2
    chosen = args.variants or variants(args.quick)
    info = run_info(
        embed_dim=EMBED_DIM,
        num_heads=NUM_HEADS,
        key_dim=KEY_DIM,
        num_random_features=NUM_RANDOM_FEATURES,
        lengths=lengths,
        repeats=args.repeats,
        memory_limit_gb=args.memory_limit_gb,
    )
    all_rows, status = [], {}
    print(f"{'variant':34s}" + "".join(f"{n:>10d}" for n in lengths) + "   (fwd+bwd ms)")
    for variant in chosen:
        rows, state, first_failed = run_variant(
            variant, lengths, args.repeats, args.memory_limit_gb, args.timeout_s
        )
        all_rows += rows
        status[variant] = {"status": state, "first_failed_length": first_failed}
        by_len = {r["length"]: r for r in rows}
        cells = [
            f"{by_len[n]['forward_backward_s'] * 1e3:10.1f}" if n in by_len else f"{'-':>10s}"
            for n in lengths
        ]
        note = "" if state == "ok" else f"   {state} at L={first_failed}"
        print(f"{variant:34s}" + "".join(cells) + note, flush=True)
    if args.merge:
        try:
            with open(os.path.join(RESULTS_DIR, "scaling.json")) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {"rows": [], "status": {}}
        kept = [r for r in previous["rows"] if r["variant"] not in status]
        all_rows = kept + all_rows
        status = {**{k: v for k, v in previous["status"].items() if k not in status}, **status}
        info["rerun_variants"] = {"date": info["date"], "variants": list(chosen)}
        if "info" in previous:
            info = {**previous["info"], "rerun_variants": info["rerun_variants"]}
    path = write_json("scaling", {"info": info, "rows": all_rows, "status": status})
    plot(all_rows, os.path.join(RESULTS_DIR, "scaling.png"))
    print(f"wrote {os.path.relpath(path)} and scaling.png")


if __name__ == "__main__":
    main()
