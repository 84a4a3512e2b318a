"""Byte-level language modelling: exact softmax attention vs FAVOR feature maps, equal budgets.

Run from the repository root:

    python examples/char_lm.py                      # the default budget (see --help)
    python examples/char_lm.py --steps 300 --variants exact favor_positive_redraw
    python examples/char_lm.py --variants exact_conv_rope favor_decay_conv_rope --merge

Every variant is the same model apart from its attention and position options: token
embeddings, `num_blocks` pre-LN decoder blocks (causal self-attention, then a GELU feed-forward
network, each with a residual connection), a final layer norm and a Dense head over the 256 bytes.
They train on the same windows of the Python standard library's source (`examples/data.py`), in
the same order, for the same number of steps, with the same widths and optimizer. The first
variants add sinusoidal positions to the token embeddings:

- ``exact``: `keras.layers.MultiHeadAttention` with `use_causal_mask=True` (softmax attention),
  in a block built here with exactly the structure of `FavorTransformerDecoder`.
- ``favor_positive_redraw``: FAVOR+ (positive random features), redrawn during training with
  `RedrawRandomFeatures`.
- ``favor_positive_fixed``: FAVOR+ with the random features drawn once, never redrawn.
- ``favor_hyperbolic``: hyperbolic positive features (2M features), redrawn.
- ``favor_relu``: generalized attention with ReLU random features, redrawn.
- ``favor_hedgehog``: the learnable Hedgehog feature map (`feature_map="hedgehog"`), trained
  from scratch with the rest of the model.
- ``favor_default``: `FavorTransformerDecoder` with its own defaults for every attention option
  (FAVOR+ positive features, M = 256 whatever `num_random_features` says, a causal
  convolution of kernel 4, no decay, no RoPE), never redrawn: what a user gets without choosing.
- ``favor_default_noconv``: the same with `causal_conv_kernel_size=None`.

The others use the decoder's long-context options (see `examples/quickstart.py`): a causal
depthwise convolution of kernel 4 before the attention (``conv``), a per-head decay of the causal
state with reaches 16 to 64 bytes, or 16 to 256, the training window (``decay``, ``decay256``;
FAVOR only: softmax attention has no state to decay), and rotary positions (``rope``) or none
(``nope``). The softmax variants with these options are `FavorTransformerDecoder` blocks with
`attention_type="softmax"`, so that exact and FAVOR attention get the same extras:

- ``exact_rope``, ``exact_conv_rope``, ``exact_conv_nope``: exact softmax attention.
- ``favor_conv_rope``: FAVOR+ positive features, redrawn, conv, RoPE.
- ``favor_decay_conv_nope``: the quickstart's model: FAVOR+ positive, redrawn, decay 16-64,
  conv, NoPE.
- ``favor_decay_conv_nope_fixed``, ``favor_hyperbolic_decay_conv_nope_fixed``: the same with
  features never redrawn (positive or hyperbolic).
- ``favor_decay_conv_rope``, ``favor_decay256_conv_rope``: decay 16-64 or 16-256, conv, RoPE.
- ``favor_hyperbolic_decay_conv_rope``: hyperbolic features, decay 16-64, conv, RoPE.

After ``exact`` has trained, it is also converted (row ``exact_to_hedgehog``): `to_favor` swaps
its `MultiHeadAttention` layers for `FavorAttention` with the learnable map and the same weights,
and `attention_transfer` trains only the maps, for `convert_steps` steps (10 % of `steps` by
default), to reproduce each softmax layer's output. Rows ``exact_to_hedgehog_window4`` and
``exact_to_hedgehog_window16`` convert it the same way with an exact window over the last 4 or
16 bytes (`local_window`, `--convert-local-windows`). Their validation bits per byte are
compared with those of the softmax model they came from.

Writes, to `--output-dir` (default `examples/results/char_lm/`): `results.md` (a markdown table of
validation bits per byte, training time and parameters), `results.csv`, `results.json` (with the
curves and settings) and `loss_curves.png` (validation bits per byte against step). With
`--merge`, the rows of the variants not trained now are kept from the previous `results.json`.
"""

import json
import math
import os
import platform
import sys
import time
from typing import NamedTuple, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from examples import data  # noqa: E402
from examples.baselines import exact_block  # noqa: E402
from examples.quickstart import compile_model, train  # noqa: E402
from keras_favor._checks import boolean, invalid  # noqa: E402
from keras_favor.convert import attention_transfer, to_favor  # noqa: E402
from keras_favor.feature_maps import Hedgehog  # noqa: E402
from keras_favor.layers import FavorTransformerDecoder, TokenAndPositionEmbedding  # noqa: E402
from keras_favor.ops import decay_rates  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "examples", "results", "char_lm")


class Variant(NamedTuple):
    """One model of the comparison: its attention and the options of its blocks.

    Attributes:
        description: the table's "attention" column.
        attention: "exact" (`MultiHeadAttention` in `examples.baselines.exact_block`),
            "softmax" (exact softmax inside `FavorTransformerDecoder(attention_type="softmax")`,
            which takes the convolution and RoPE options) or "favor".
        feature_map: the FAVOR feature map ("hedgehog": `Hedgehog`, learnable).
        redraw: redraw the random features during training (`RedrawRandomFeatures`).
        positions: "sine" (sinusoidal embeddings added to the tokens), "rotary" (RoPE in every
            block) or None (NoPE: order comes only from causality and the convolution).
        decay_reaches: None, or the reaches (shortest, longest) in positions of the per-head
            state decay `keras_favor.ops.decay_rates(num_heads, shortest, longest)`.
        causal_conv_kernel_size: None, or the kernel of the blocks' causal convolution.
        package_defaults: the FAVOR options (feature map, number of random features, chunk)
            are `FavorTransformerDecoder`'s defaults, not the script's `num_random_features`.
    """

    description: str
    attention: str = "favor"
    feature_map: Optional[str] = "softmax_positive"
    redraw: bool = False
    positions: Optional[str] = "sine"
    decay_reaches: Optional[tuple] = None
    causal_conv_kernel_size: Optional[int] = None
    package_defaults: bool = False


# The decay and convolution of the quickstart: heads reaching 16 to 64 bytes, kernel 4.
QUICKSTART_REACHES = (16, 64)
VARIANTS = {
    "exact": Variant("exact softmax (MultiHeadAttention)", attention="exact", feature_map=None),
    "favor_positive_redraw": Variant("FAVOR+ positive features, redrawn", redraw=True),
    "favor_positive_fixed": Variant("FAVOR+ positive features, never redrawn"),
    "favor_hyperbolic": Variant(
        "FAVOR+ hyperbolic features (2M), redrawn", feature_map="softmax_hyperbolic", redraw=True
    ),
    "favor_relu": Variant("FAVOR ReLU random features, redrawn", feature_map="relu", redraw=True),
    "favor_hedgehog": Variant(
        "learnable Hedgehog map, trained from scratch", feature_map="hedgehog"
    ),
    "favor_default": Variant(
        "`FavorTransformerDecoder` defaults: FAVOR+ positive, M = 256, never redrawn, conv 4",
        package_defaults=True,
        causal_conv_kernel_size=4,
    ),
    "favor_default_noconv": Variant(
        "`FavorTransformerDecoder` defaults without the convolution",
        package_defaults=True,
    ),
    "exact_rope": Variant(
        "exact softmax, RoPE", attention="softmax", feature_map=None, positions="rotary"
    ),
    "exact_conv_rope": Variant(
        "exact softmax, conv 4, RoPE",
        attention="softmax",
        feature_map=None,
        positions="rotary",
        causal_conv_kernel_size=4,
    ),
    "exact_conv_nope": Variant(
        "exact softmax, conv 4, NoPE",
        attention="softmax",
        feature_map=None,
        positions=None,
        causal_conv_kernel_size=4,
    ),
    "favor_conv_rope": Variant(
        "FAVOR+ positive, redrawn, conv 4, RoPE",
        redraw=True,
        positions="rotary",
        causal_conv_kernel_size=4,
    ),
    "favor_decay_conv_nope": Variant(
        "FAVOR+ positive, redrawn, decay 16-64, conv 4, NoPE (the quickstart's)",
        redraw=True,
        positions=None,
        decay_reaches=QUICKSTART_REACHES,
        causal_conv_kernel_size=4,
    ),
    "favor_decay_conv_nope_fixed": Variant(
        "FAVOR+ positive, never redrawn, decay 16-64, conv 4, NoPE",
        positions=None,
        decay_reaches=QUICKSTART_REACHES,
        causal_conv_kernel_size=4,
    ),
    "favor_hyperbolic_decay_conv_nope_fixed": Variant(
        "FAVOR+ hyperbolic (2M), never redrawn, decay 16-64, conv 4, NoPE",
        feature_map="softmax_hyperbolic",
        positions=None,
        decay_reaches=QUICKSTART_REACHES,
        causal_conv_kernel_size=4,
    ),
    "favor_decay_conv_rope": Variant(
        "FAVOR+ positive, redrawn, decay 16-64, conv 4, RoPE",
        redraw=True,
        positions="rotary",
        decay_reaches=QUICKSTART_REACHES,
        causal_conv_kernel_size=4,
    ),
    "favor_hyperbolic_decay_conv_rope": Variant(
        "FAVOR+ hyperbolic (2M), redrawn, decay 16-64, conv 4, RoPE",
        feature_map="softmax_hyperbolic",
        redraw=True,
        positions="rotary",
        decay_reaches=QUICKSTART_REACHES,
        causal_conv_kernel_size=4,
    ),
    "favor_decay256_conv_rope": Variant(
        "FAVOR+ positive, redrawn, decay 16-256, conv 4, RoPE",
        redraw=True,
        positions="rotary",
        decay_reaches=(16, 256),
        causal_conv_kernel_size=4,
    ),
}
CONVERTED = "exact_to_hedgehog"
CONVERTED_DESCRIPTION = "`exact` converted: to_favor + attention_transfer (maps only)"


# The conversions of `exact`: the learnable map alone, and with exact windows of 4 and 16 bytes.
CONVERT_LOCAL_WINDOWS = (None, 4, 16)


def converted_name(local_window=None):
    """The row of `exact` converted with this exact local window (None: the map alone)."""
    return CONVERTED if local_window is None else f"{CONVERTED}_window{local_window}"


def is_converted(variant):
    return variant == CONVERTED or variant.startswith(CONVERTED + "_window")


def description(variant):
    """The table's "attention" column of a variant (or of a converted model)."""
    if not is_converted(variant):
        return VARIANTS[variant].description
    if variant == CONVERTED:
        return CONVERTED_DESCRIPTION
    window = variant[len(CONVERTED + "_window") :]
    return f"{CONVERTED_DESCRIPTION}, exact over the last {window} bytes (`local_window={window}`)"


def build_model(
    variant,
    width=128,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=512,
    num_random_features=64,
    causal_chunk_size=128,
    hedgehog_feature_dim=256,
    seed=0,
):
    """The byte-level language model of one variant (see `VARIANTS`)."""
    spec = VARIANTS[variant]
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(
        data.VOCABULARY_SIZE,
        None,
        width,
        # The same sinusoidal positions for exact attention and FAVOR; RoPE and NoPE have none.
        position_embedding_type="sine" if spec.positions == "sine" else None,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02, seed=seed),
        name="embedding",
    )(token_ids)
    options = {}
    if spec.attention == "softmax":
        options["attention_type"] = "softmax"
    elif not spec.package_defaults:
        feature_map = spec.feature_map
        if feature_map == "hedgehog":
            feature_map = Hedgehog(feature_dim=hedgehog_feature_dim)
        options.update(
            feature_map=feature_map,
            num_random_features=num_random_features,
            causal_chunk_size=causal_chunk_size,
        )
    if spec.decay_reaches:
        options["decay"] = decay_rates(num_heads, *spec.decay_reaches)
    options["causal_conv_kernel_size"] = spec.causal_conv_kernel_size
    if spec.positions == "rotary":
        options["use_rotary_embedding"] = True
    for i in range(num_blocks):
        block_seed = seed * 1000 + 10 * i
        if spec.attention == "exact":
            x = exact_block(x, intermediate_dim, num_heads, block_seed, f"decoder_{i}", causal=True)
        else:
            x = FavorTransformerDecoder(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                activation="gelu",
                normalize_first=True,
                seed=block_seed,
                name=f"decoder_{i}",
                **options,
            )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(data.VOCABULARY_SIZE, name="logits")(x)
    return keras.Model(token_ids, logits, name=f"byte_lm_{variant}")


def convert_and_transfer(
    model,
    corpus,
    steps,
    batch_size,
    sequence_length,
    validation,
    *,
    learning_rate=3e-2,
    feature_dim=256,
    local_window=None,
    trained_steps=None,
    seed=0,
    verbose=1,
):
    """Converts the trained softmax `model` to FAVOR with learnable maps; returns its result row.

    `to_favor(model, feature_map=Hedgehog(feature_dim), local_window=local_window)`, then
    `attention_transfer` for `steps` batches of `batch_size` random training windows (only the
    maps train), then the validation loss of both models on `validation` (inputs, targets).
    """
    val_x, val_y = validation
    favor = to_favor(
        model,
        feature_map=Hedgehog(feature_dim=feature_dim),
        seed=seed,
        local_window=local_window,
    )
    windows = data.RandomWindows(corpus.train, sequence_length, batch_size, steps, seed + 1)
    name = converted_name(local_window)
    print(f"\n== {name}: {description(name)}, {steps} steps")
    start = time.perf_counter()
    history = attention_transfer(
        favor, model, windows, epochs=1, learning_rate=learning_rate, verbose=verbose
    )
    seconds = time.perf_counter() - start
    compile_model(favor, 1)  # the training loss, for `evaluate`
    bpb, exact_bpb = (
        data.bits_per_byte(m.evaluate(val_x, val_y, batch_size=batch_size, verbose=0))
        for m in (favor, model)
    )
    trained = sum(int(np.prod(w.shape)) for w in favor.trainable_weights if "hedgehog" in w.path)
    print(
        f"{name}: validation {bpb:.3f} bits/byte vs {exact_bpb:.3f} for exact "
        f"({100 * (bpb / exact_bpb - 1):+.2f} %), {seconds:.0f} s"
    )
    return {
        "variant": name,
        "local_window": local_window,
        "validation_bits_per_byte": bpb,
        "final_train_bits_per_byte": None,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "parameters": data.trainable_parameters(favor),
        "transfer_steps": steps,
        "transfer_loss": [float(v) for v in history.history["loss"]],
        "trained_parameters": trained,
        "exact_validation_bits_per_byte": exact_bpb,
        "relative_to_exact": bpb / exact_bpb - 1,
        "steps": [(trained_steps or 0) + steps],
        "train_bits_per_byte": [],
        "val_bits_per_byte": [bpb],
    }


def load_previous(output_dir, settings):
    """The rows of `output_dir/results.json` by variant ({} if there is none), checked to come
    from the same settings as `settings` apart from `variants` (else a ValueError listing the
    differences: the rows would not be comparable)."""
    path = os.path.join(output_dir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        previous = json.load(f)
    differences = {
        key: (previous["settings"].get(key), value)
        for key, value in settings.items()
        if key != "variants" and previous["settings"].get(key) != value
    }
    if differences:
        raise ValueError(
            f"merge=True needs the settings of {path} apart from `variants`; these differ "
            f"(previous, now): {differences}"
        )
    return {row["variant"]: row for row in previous["results"]}


def merge_rows(previous, results):
    """The rows of `results`, and of `previous` for the variants not in `results`, in the order
    of `VARIANTS` (the conversion right after `exact`). A previous conversion row is kept only
    when `exact` is not in `results`: it belongs to the previous `exact` model."""
    rows = dict(previous)
    if any(row["variant"] == "exact" for row in results):
        rows = {name: row for name, row in rows.items() if not is_converted(name)}
    rows.update((row["variant"], row) for row in results)
    converted = sorted(
        (name for name in rows if is_converted(name)),
        key=lambda name: rows[name].get("local_window") or 0,
    )
    order = ["exact", *converted, *(variant for variant in VARIANTS if variant != "exact")]
    return [rows[name] for name in order if name in rows]


def exact_counterpart(variant):
    """The exact softmax variant with the same positions and convolution as a FAVOR `variant`
    (its decay aside: softmax attention has none), or None (no such variant, or not FAVOR)."""
    spec = VARIANTS.get(variant)
    if spec is None or spec.attention != "favor":
        return None
    for name, other in VARIANTS.items():
        if (
            other.attention != "favor"
            and other.positions == spec.positions
            and other.causal_conv_kernel_size == spec.causal_conv_kernel_size
        ):
            return name
    return None


def write_results(output_dir, results, settings):
    """Writes results.json, results.csv, results.md and loss_curves.png; returns their paths.

    The table gives each row's validation bits per byte relative to `exact`'s and, for FAVOR,
    to those of the exact variant with the same extras (`exact_counterpart`), when they ran.
    """
    columns = [
        "variant",
        "validation_bits_per_byte",
        "final_train_bits_per_byte",
        "train_seconds",
        "seconds_per_step",
        "parameters",
    ]
    header = [
        f"Byte-level LM on the Python {settings['python']} standard library source: "
        f"{settings['steps']} steps of {settings['batch_size']} x {settings['sequence_length']} "
        f"bytes, width {settings['width']}, {settings['num_blocks']} blocks, "
        f"{settings['num_heads']} heads, M = {settings['num_random_features']} random features"
        + (f", redraw every {settings['redraw_every']} steps" if settings["redraw_every"] else "")
        + f"; validation on {settings['validation_bytes']:,} held-out bytes.",
        "",
        "| variant | attention | validation bits/byte | vs `exact` | vs exact, same extras "
        "| train bits/byte (last epoch) | train time (s) | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        f"`{row['variant']}`: {row['transfer_steps']} attention-transfer steps "
        f"({100 * row['transfer_steps'] / settings['steps']:.0f} % of the training "
        f"steps) on {row['trained_parameters']:,} feature-map parameters; validation "
        f"bits/byte {100 * row['relative_to_exact']:+.2f} % relative to `exact`."
        for row in results
        if is_converted(row["variant"])
    ]
    if notes:
        header[1] = "\n".join(notes) + "\n"
    bits = {row["variant"]: row["validation_bits_per_byte"] for row in results}

    def relative(variant, reference):
        if variant == reference or reference not in bits:
            return "—"
        return f"{100 * (bits[variant] / bits[reference] - 1):+.1f} %"

    def row_line(row):
        name = row["variant"]
        train = row["final_train_bits_per_byte"]
        train = "—" if train is None else f"{train:.3f}"
        counterpart = exact_counterpart(name)
        same_extras = "—"
        if counterpart not in (None, "exact") and counterpart in bits:
            same_extras = f"{relative(name, counterpart)} (`{counterpart}`)"
        return (
            f"| `{name}` | {description(name)} | {row['validation_bits_per_byte']:.3f} | "
            f"{relative(name, 'exact')} | {same_extras} | {train} | "
            f"{row['train_seconds']:.0f} | {row['seconds_per_step']:.3f} |"
        )

    paths = data.write_results_tables(output_dir, settings, results, columns, header, row_line)
    paths["loss_curves.png"] = os.path.join(output_dir, "loss_curves.png")
    _plot(paths["loss_curves.png"], results)
    return paths


def _plot(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab20")
    for i, row in enumerate(results):
        color = colors(i % colors.N)
        if not row["train_bits_per_byte"]:  # a converted model: one point, after its transfer
            ax.plot(
                row["steps"],
                row["val_bits_per_byte"],
                "*",
                color=color,
                ms=12,
                label=row["variant"],
            )
            continue
        ax.plot(
            row["steps"],
            row["val_bits_per_byte"],
            "-o",
            color=color,
            ms=3,
            label=f"{row['variant']} (validation)",
        )
        # Training loss: the mean over each epoch, drawn at the epoch's middle step.
        half = row["steps"][0] / 2
        middle = [step - half for step in row["steps"]]
        ax.plot(middle, row["train_bits_per_byte"], "--", color=color, alpha=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per byte")
    ax.set_title("Byte-level LM: validation (solid) and training (dashed) loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    variants=tuple(VARIANTS),
    steps=600,
    evaluations=6,
    batch_size=16,
    sequence_length=256,
    width=128,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=512,
    num_random_features=64,
    learning_rate=2e-3,
    redraw_every=250,
    validation_windows=64,
    convert_steps=None,
    convert_learning_rate=3e-2,
    convert_local_windows=CONVERT_LOCAL_WINDOWS,
    hedgehog_feature_dim=256,
    max_train_bytes=None,
    max_validation_bytes=None,
    output_dir=DEFAULT_OUTPUT_DIR,
    merge=False,
    seed=0,
    verbose=1,
):
    """Trains every variant with the same budget and writes the comparison.

    Args:
        variants: names from `VARIANTS`.
        steps: optimizer steps per variant.
        evaluations: the steps are split into this many epochs, each followed by a validation
            pass (the points of the curves).
        batch_size, sequence_length: training windows per step and their length in bytes.
        width, num_heads, num_blocks, intermediate_dim, num_random_features: model size.
        learning_rate: peak learning rate (linear warm-up, cosine decay).
        redraw_every: steps between redraws for the variants that redraw (the default redraws
            before steps 250 and 500 of 600, counted from 0, leaving the last steps to settle
            on the final features).
        validation_windows: validation windows of `sequence_length` bytes, spread evenly over
            the validation split.
        convert_steps: attention-transfer steps of the `exact_to_hedgehog` conversion (batches
            like training's); None: `steps // 10`; 0: no conversion. Needs `exact` in
            `variants`.
        convert_learning_rate: Adam's learning rate for the attention transfer.
        convert_local_windows: one conversion per entry: None (the map alone, row
            `exact_to_hedgehog`) or w, an exact window over the last w bytes with the map
            beyond it (`local_window=w`, row `exact_to_hedgehog_window<w>`).
        hedgehog_feature_dim: F', the projection width of the learnable maps (2F' features), in
            `favor_hedgehog` and in the conversion.
        max_train_bytes, max_validation_bytes: cap the corpus (None: all of it).
        output_dir: where the tables and the plot go.
        merge: keep the rows of the variants not trained now from `output_dir/results.json`
            (whose settings must be the same apart from `variants`), so that a table of every
            variant can grow a few variants at a time.
        seed: seeds the weights, random features and data order (the same for every variant).
        verbose: Keras progress bars (1) or quiet (0).

    Returns:
        A dict: "results" (one dict per variant trained now, and the conversion), "paths" (the
        files written).
    """
    if not variants or any(v not in VARIANTS for v in variants):
        raise invalid("variants", f"names from {list(VARIANTS)}", list(variants))
    boolean(merge, "merge")
    corpus = data.load_corpus(max_train_bytes, max_validation_bytes)
    val_x, val_y = data.validation_windows(corpus.validation, sequence_length, validation_windows)
    print(f"Corpus: {corpus}")
    settings = {
        "variants": list(variants),
        "steps": steps,
        "evaluations": evaluations,
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "width": width,
        "num_heads": num_heads,
        "num_blocks": num_blocks,
        "intermediate_dim": intermediate_dim,
        "num_random_features": num_random_features,
        "learning_rate": learning_rate,
        "redraw_every": redraw_every,
        "validation_windows": validation_windows,
        "convert_steps": convert_steps,
        "convert_learning_rate": convert_learning_rate,
        "hedgehog_feature_dim": hedgehog_feature_dim,
        "validation_bytes": int(val_x.size),
        "train_bytes": int(corpus.train.size),
        "seed": seed,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }
    previous = load_previous(output_dir, settings) if merge else {}
    results = []
    for variant in variants:
        keras.utils.set_random_seed(seed)
        model = build_model(
            variant,
            width=width,
            num_heads=num_heads,
            num_blocks=num_blocks,
            intermediate_dim=intermediate_dim,
            num_random_features=num_random_features,
            hedgehog_feature_dim=hedgehog_feature_dim,
            seed=seed,
        )
        redraw = VARIANTS[variant].redraw
        print(
            f"\n== {variant}: {description(variant)}, "
            f"{data.trainable_parameters(model):,} trainable parameters"
        )
        start = time.perf_counter()
        history, _ = train(
            model,
            corpus,
            steps,
            batch_size,
            sequence_length,
            epochs=evaluations,
            learning_rate=learning_rate,
            redraw_every=redraw_every if redraw else None,
            validation_windows=validation_windows,
            seed=seed,
            verbose=verbose,
        )
        seconds = time.perf_counter() - start
        train_bpb = [data.bits_per_byte(v) for v in history["loss"]]
        val_bpb = [data.bits_per_byte(v) for v in history["val_loss"]]
        steps_per_epoch = max(1, steps // max(1, min(evaluations, steps)))
        done = steps_per_epoch * len(val_bpb)
        results.append(
            {
                "variant": variant,
                "validation_bits_per_byte": val_bpb[-1],
                "final_train_bits_per_byte": train_bpb[-1],
                "train_seconds": seconds,
                "seconds_per_step": seconds / done,
                "parameters": data.trainable_parameters(model),
                "steps": [steps_per_epoch * (i + 1) for i in range(len(val_bpb))],
                "train_bits_per_byte": train_bpb,
                "val_bits_per_byte": val_bpb,
            }
        )
        print(f"{variant}: validation {val_bpb[-1]:.3f} bits/byte, {seconds:.0f} s")
        if variant == "exact" and convert_steps != 0:
            for local_window in convert_local_windows:
                results.append(
                    convert_and_transfer(
                        model,
                        corpus,
                        max(1, steps // 10) if convert_steps is None else convert_steps,
                        batch_size,
                        sequence_length,
                        (val_x, val_y),
                        learning_rate=convert_learning_rate,
                        feature_dim=hedgehog_feature_dim,
                        local_window=local_window,
                        trained_steps=done,
                        seed=seed,
                        verbose=verbose,
                    )
                )
    table = merge_rows(previous, results)
    variants_in_table = [row["variant"] for row in table if row["variant"] in VARIANTS]
    paths = write_results(output_dir, table, {**settings, "variants": variants_in_table})
    with open(paths["results.md"]) as f:
        print("\n" + f.read())
    print("Wrote " + ", ".join(paths.values()))
    if not all(math.isfinite(r["validation_bits_per_byte"]) for r in results):
        raise RuntimeError("A variant's validation loss is not finite.")
    return {"results": results, "paths": paths}


def _window_argument(text):
    """`--convert-local-windows none 4 16`: "none" (the map alone) or a window in bytes."""
    return None if text.lower() == "none" else int(text)


if __name__ == "__main__":
    main(
        **data.parse_main_arguments(
            main,
            types={
                "max_train_bytes": int,
                "max_validation_bytes": int,
                "convert_local_windows": _window_argument,
            },
            choices={"variants": list(VARIANTS)},
        )
    )
