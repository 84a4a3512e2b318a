"""ListOps as in Long Range Arena: FAVOR vs exact attention on long sequences (up to 2000 tokens).

Run from the repository root:

    python examples/long_classification.py            # the default budget (see --help)

The data is generated here, deterministically, with the generator of Long Range Arena's ListOps
(Tay et al. 2021; Nangia & Bowman 2018): random nested expressions over the digits 0-9 with the
operators MAX, MIN, MED (median, rounded down) and SM (sum modulo 10), e.g.
``[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]`` -> 5. As in LRA: an operator node has 2 to
`max_args` arguments, each argument is a nested operator with probability 0.25 (never below
`max_depth`), and expressions are kept when their token count lies strictly between `min_length`
and `max_length` (LRA: 500 and 2000). Tokens are the operators, the closing bracket and the digits
(what LRA's input pipeline keeps); the label (10 classes) is the expression's value.

Both classifiers are the same apart from their attention: token embeddings plus sinusoidal
positions (token 0 is padding: `mask_zero=True`, so every block and the pooling ignore padded
positions), `num_blocks` pre-LN encoder blocks, a final layer norm, masked mean pooling and a Dense
softmax over the 10 values. ``favor`` uses `FavorTransformerEncoder` (FAVOR+, linear in length);
``exact`` a block built here with the same structure around `keras.layers.MultiHeadAttention`
(softmax, quadratic in length). Same data, steps, widths and optimizer.

At the default budget (a few minutes on 2 CPU cores) neither model learns ListOps: both stay near
the most frequent class (docs/examples.md has the figures). The example is therefore a speed
demonstration, FAVOR against exact attention on the same data at lengths up to 2000 (training
step time and inference time per batch). For a task where FAVOR learns a
dependency thousands of tokens long, see `examples/long_recall.py`.

Writes, to `--output-dir` (default `examples/results/long_classification/`): `results.md`,
`results.csv` and `results.json` (accuracy, training time, inference time per batch at the full
padded length, and the settings).
"""

import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from examples import data  # noqa: E402
from examples.baselines import exact_block  # noqa: E402
from keras_favor.layers import FavorTransformerEncoder, TokenAndPositionEmbedding  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "examples", "results", "long_classification")

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # probability that an argument is a nested operator (LRA's VALUE_P)
VOCABULARY = ("<pad>",) + OPERATORS + (END,) + tuple(str(d) for d in range(10))
TOKEN_IDS = {token: i for i, token in enumerate(VOCABULARY)}
NUM_CLASSES = 10
VARIANTS = ("favor", "exact")


class _TooLong(Exception):
    pass


def _apply(operator, values):
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))  # the mean of the middle two, rounded down
    return sum(values) % 10  # "[SM"


def _expression(rng, depth, max_depth, max_args, tokens, max_length):
    """Appends a random expression to `tokens` and returns its value (LRA's distribution)."""
    if depth < max_depth and rng.random() <= VALUE_P:
        num_args = rng.randint(2, max_args)
        operator = OPERATORS[rng.randrange(len(OPERATORS))]
        tokens.append(operator)
        values = [
            _expression(rng, depth + 1, max_depth, max_args, tokens, max_length)
            for _ in range(num_args)
        ]
        tokens.append(END)
        value = _apply(operator, values)
    else:
        value = rng.randrange(10)
        tokens.append(str(value))
    if len(tokens) >= max_length:  # rejected anyway: stop growing it
        raise _TooLong
    return value


def generate_listops(
    num_examples, min_length=500, max_length=2000, max_depth=10, max_args=10, seed=0
):
    """Distinct ListOps expressions with min_length < tokens < max_length, and their values.

    Deterministic for a given seed (Python's `random.Random`). Returns (list of token lists,
    int array of values).
    """
    rng = random.Random(seed)
    seen, expressions, labels = set(), [], []
    while len(expressions) < num_examples:
        tokens = []
        try:
            value = _expression(rng, 1, max_depth, max_args, tokens, max_length)
        except _TooLong:
            continue
        key = " ".join(tokens)
        if min_length < len(tokens) < max_length and key not in seen:
            seen.add(key)
            expressions.append(tokens)
            labels.append(value)
    return expressions, np.asarray(labels, dtype="int32")


def encode(expressions, length):
    """Token lists -> (N, length) int32 ids, right-padded with 0."""
    ids = np.zeros((len(expressions), length), dtype="int32")
    for i, tokens in enumerate(expressions):
        ids[i, : len(tokens)] = [TOKEN_IDS[t] for t in tokens]
    return ids


def build_classifier(
    variant,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=128,
    num_random_features=64,
    dropout=0.1,
    seed=0,
):
    """A ListOps classifier: (B, L) token ids (0 = padding) -> (B, 10) class probabilities."""
    if variant not in VARIANTS:
        raise ValueError(
            f"Received an invalid value for argument `variant`, expected one of {VARIANTS}. "
            f"Received: variant={variant!r}"
        )
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(
        len(VOCABULARY),
        None,
        width,
        position_embedding_type="sine",
        mask_zero=True,  # padding mask for every block and the pooling
        name="embedding",
    )(token_ids)
    for i in range(num_blocks):
        block_seed = seed * 1000 + 10 * i
        if variant == "exact":
            x = exact_block(x, intermediate_dim, num_heads, block_seed, f"encoder_{i}")
        else:
            x = FavorTransformerEncoder(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                activation="gelu",
                normalize_first=True,
                num_random_features=num_random_features,
                seed=block_seed,
                name=f"encoder_{i}",
            )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="masked_mean")(x)  # ignores padded positions
    x = keras.layers.Dropout(dropout, seed=seed)(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="value")(x)
    return keras.Model(token_ids, outputs, name=f"listops_{variant}")


class Batches(keras.utils.PyDataset):
    """`steps_per_epoch` batches per epoch from shuffled passes over (x, y), the same order for
    every variant: pass p over the data is `permutation(seed, p)`."""

    def __init__(self, x, y, batch_size, steps_per_epoch, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.epoch = 0
        self._permutations = {}

    def _permutation(self, data_pass):
        if data_pass not in self._permutations:
            rng = np.random.default_rng((self.seed, data_pass))
            self._permutations[data_pass] = rng.permutation(len(self.x))
        return self._permutations[data_pass]

    def __len__(self):
        return self.steps_per_epoch

    def __getitem__(self, index):
        start = (self.epoch * self.steps_per_epoch + index) * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        passes, within = np.divmod(positions, len(self.x))
        rows = [self._permutation(int(p))[int(w)] for p, w in zip(passes, within)]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        self.epoch += 1


def _inference_seconds(model, ids, batch_size, repeats=3):
    """Median wall time of `predict_on_batch` on one padded batch (after a warm-up call)."""
    batch = ids[:batch_size]
    model.predict_on_batch(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(output_dir, results, settings):
    """Writes results.json, results.csv and results.md; returns their paths."""
    columns = [
        "variant",
        "test_accuracy",
        "train_accuracy",
        "train_seconds",
        "seconds_per_step",
        "inference_seconds_per_batch",
        "parameters",
    ]
    header = [
        f"ListOps (LRA generator), lengths {settings['min_length'] + 1}-"
        f"{settings['max_length'] - 1} tokens (median {settings['median_length']}), padded to "
        f"{settings['padded_length']}; {settings['train_examples']} training / "
        f"{settings['test_examples']} test expressions; {settings['steps']} steps of "
        f"{settings['batch_size']}; width {settings['width']}, {settings['num_blocks']} blocks, "
        f"{settings['num_heads']} heads, M = {settings['num_random_features']}. "
        f"Most frequent test value: {settings['majority_baseline']:.1%}.",
        "",
        "| attention | test accuracy | train accuracy | train time (s) | s/step "
        f"| inference, batch of {settings['batch_size']} x {settings['padded_length']} (s) |",
        "|---|---|---|---|---|---|",
    ]

    def row_line(row):
        return (
            f"| {row['variant']} | {row['test_accuracy']:.1%} | {row['train_accuracy']:.1%} | "
            f"{row['train_seconds']:.0f} | {row['seconds_per_step']:.3f} | "
            f"{row['inference_seconds_per_batch']:.3f} |"
        )

    return data.write_results_tables(output_dir, settings, results, columns, header, row_line)


def main(
    variants=VARIANTS,
    train_examples=2400,
    test_examples=500,
    min_length=500,
    max_length=2000,
    max_depth=10,
    max_args=10,
    steps=300,
    epochs=3,
    batch_size=8,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=128,
    num_random_features=64,
    learning_rate=1e-3,
    dropout=0.1,
    output_dir=DEFAULT_OUTPUT_DIR,
    seed=0,
    verbose=1,
):
    """Generates ListOps, trains each classifier with the same budget, writes the tables.

    Args:
        variants: "favor" and/or "exact".
        train_examples, test_examples: expressions generated for each split (disjoint).
        min_length, max_length: keep expressions with min_length < tokens < max_length; every
            sequence is padded to max_length - 1 tokens.
        max_depth, max_args: the generator's nesting depth and arguments per operator.
        steps: optimizer steps per variant, split into `epochs` epochs.
        batch_size: sequences per step.
        width, num_heads, num_blocks, intermediate_dim, num_random_features, dropout: model.
        learning_rate: peak learning rate (linear warm-up, cosine decay).
        output_dir: where the tables go.
        seed: seeds the data, the weights and the random features.
        verbose: Keras progress bars (1) or quiet (0).

    Returns:
        A dict: "results" (one dict per variant), "settings", "paths".
    """
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(
                f"Received an invalid value for argument `variants`, expected names from "
                f"{VARIANTS}. Received: variants={list(variants)}"
            )
    start = time.perf_counter()
    expressions, labels = generate_listops(
        train_examples + test_examples, min_length, max_length, max_depth, max_args, seed
    )
    padded_length = max_length - 1
    ids = encode(expressions, padded_length)
    train_x, train_y = ids[:train_examples], labels[:train_examples]
    test_x, test_y = ids[train_examples:], labels[train_examples:]
    lengths = [len(e) for e in expressions]
    majority = float(np.bincount(test_y, minlength=NUM_CLASSES).max() / len(test_y))
    print(
        f"Generated {len(expressions)} ListOps expressions in {time.perf_counter() - start:.1f} s"
        f" (lengths {min(lengths)}-{max(lengths)}, median {int(np.median(lengths))}); "
        f"e.g. {' '.join(expressions[0][:24])} ... -> {labels[0]}"
    )
    epochs = max(1, min(epochs, steps))
    steps_per_epoch = max(1, steps // epochs)
    results = []
    for variant in variants:
        keras.utils.set_random_seed(seed)
        model = build_classifier(
            variant,
            width=width,
            num_heads=num_heads,
            num_blocks=num_blocks,
            intermediate_dim=intermediate_dim,
            num_random_features=num_random_features,
            dropout=dropout,
            seed=seed,
        )
        total = steps_per_epoch * epochs
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            max(1, total - total // 10),
            alpha=0.1,
            warmup_target=learning_rate,
            warmup_steps=max(1, total // 10),
        )
        model.compile(
            optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, global_clipnorm=1.0),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        print(f"\n== {variant}: {data.trainable_parameters(model):,} parameters")
        batches = Batches(train_x, train_y, batch_size, steps_per_epoch, seed)
        begin = time.perf_counter()
        history = model.fit(batches, epochs=epochs, verbose=verbose)
        seconds = time.perf_counter() - begin
        _, test_accuracy = model.evaluate(test_x, test_y, batch_size=batch_size, verbose=0)
        inference = _inference_seconds(model, test_x, batch_size)
        results.append(
            {
                "variant": variant,
                "test_accuracy": float(test_accuracy),
                "train_accuracy": float(history.history["accuracy"][-1]),
                "train_seconds": seconds,
                "seconds_per_step": seconds / total,
                "inference_seconds_per_batch": inference,
                "parameters": data.trainable_parameters(model),
                "loss": [float(v) for v in history.history["loss"]],
                "accuracy": [float(v) for v in history.history["accuracy"]],
            }
        )
        print(f"{variant}: test accuracy {test_accuracy:.1%}, {seconds:.0f} s")
    settings = {
        "variants": list(variants),
        "train_examples": train_examples,
        "test_examples": test_examples,
        "min_length": min_length,
        "max_length": max_length,
        "median_length": int(np.median(lengths)),
        "padded_length": padded_length,
        "max_depth": max_depth,
        "max_args": max_args,
        "steps": steps_per_epoch * epochs,
        "batch_size": batch_size,
        "width": width,
        "num_heads": num_heads,
        "num_blocks": num_blocks,
        "intermediate_dim": intermediate_dim,
        "num_random_features": num_random_features,
        "learning_rate": learning_rate,
        "dropout": dropout,
        "majority_baseline": majority,
        "seed": seed,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }
    paths = write_results(output_dir, results, settings)
    with open(paths["results.md"]) as f:
        print("\n" + f.read())
    print("Wrote " + ", ".join(paths.values()))
    return {"results": results, "settings": settings, "paths": paths}


if __name__ == "__main__":
    main(**data.parse_main_arguments(main, choices={"variants": list(VARIANTS)}))
