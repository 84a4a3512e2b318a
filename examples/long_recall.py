"""Multi-query associative recall across thousands of tokens: FAVOR vs exact attention.

Run from the repository root:

    python examples/long_recall.py            # the default budget (see --help)

The task is multi-query associative recall (MQAR; Zoology, Arora et al. 2023) with a long gap.
Each sequence holds `num_pairs` key-value pairs (distinct keys), then `gap` noise tokens, then
`num_queries` of its keys again, in a random order:

    k17 v3  k5 v41  ...  k60 v9   n12 n40 n3 ... (gap noise tokens) ...   k5 k60 k17 ...

Keys, values and noise come from three disjoint vocabularies (`num_keys`, `num_values`,
`num_noise` tokens). After each query key the model must output that key's value, which was
stored at least `gap + 1` positions earlier: with the default evaluation gaps the answer is
2048 to 8192+ tokens away. A value is uniform over `num_values` tokens whatever came before, so
guessing gives 1 / `num_values` (chance, stated in the table).

Both models are the same apart from their attention: token embeddings without positions, then
`num_blocks` pre-LN `FavorTransformerDecoder` blocks (causal), a final layer norm and a Dense
head over the values at the query positions. ``favor`` uses FAVOR attention (linear in length);
``exact`` the same blocks with `attention_type="softmax"` (`keras.layers.MultiHeadAttention`:
exact and quadratic in length), with the same layers and parameter count. Same data, steps and
optimizer. What lets linear attention learn the task:

- `causal_conv_kernel_size=2`: a causal convolution mixes each position with the one before it,
  so the position of a value also carries its key. A query key then only has to match it: one
  attention lookup, without first learning to find "the token after my key".
- No position embeddings and no decay: the lookup is the same at every distance, so a model
  trained on short gaps applies unchanged to long ones, and every head keeps its whole past.
- A short first epoch (`first_epoch_gaps=(0, 16)`, sequences of 48-64 tokens): the model first
  learns the lookup where the stored pair's share of the attention is largest. Without it,
  exact attention still learns within 300 steps, but FAVOR stayed on a plateau (10-30 %
  accuracy) through the whole budget for some seeds; docs/examples.md lists the trials.
- A kernel smoother retrieves a value only if its key dominates the normaliser, a sum over every
  earlier position (2000+ noise positions at gap 2048). What remains of the noise's share shows
  at the longest gaps, where FAVOR's accuracy starts to fall.

Training sees short gaps only (`first_epoch_gaps`, then `train_gaps`: cheap); the evaluation gaps (`eval_gaps`) are 16
to 64 times longer than any training gap. FAVOR's cost per token does not grow with the gap;
exact attention's does, so it is evaluated up to `exact_max_gap` only.

Writes, to `--output-dir` (default `examples/results/long_recall/`): `results.md`, `results.csv`
and `results.json` (accuracy at every gap, training time, inference time per sequence, the
settings).
"""

import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from examples import data  # noqa: E402
from keras_favor import RedrawRandomFeatures, _checks  # noqa: E402
from keras_favor.layers import FavorTransformerDecoder  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "examples", "results", "long_recall")
VARIANTS = ("favor", "exact")
ATTENTION_TYPES = {"favor": "favor", "exact": "softmax"}


class Task:
    """MQAR with a gap: the vocabulary layout and a sampler of (inputs, targets) batches.

    Token ids: keys 0..num_keys-1, then values, then noise. Targets are value indices
    0..num_values-1.
    """

    def __init__(self, num_pairs=16, num_queries=16, num_keys=64, num_values=64, num_noise=64):
        for name, value in (
            ("num_pairs", num_pairs),
            ("num_queries", num_queries),
            ("num_keys", num_keys),
            ("num_values", num_values),
            ("num_noise", num_noise),
        ):
            _checks.positive_int(value, name)
        if num_pairs > num_keys:
            raise _checks.invalid("num_pairs", f"at most num_keys={num_keys}", num_pairs)
        if num_queries > num_pairs:
            raise _checks.invalid("num_queries", f"at most num_pairs={num_pairs}", num_queries)
        self.num_pairs = num_pairs
        self.num_queries = num_queries
        self.num_keys = num_keys
        self.num_values = num_values
        self.num_noise = num_noise

    @property
    def vocabulary_size(self):
        return self.num_keys + self.num_values + self.num_noise

    @property
    def chance(self):
        """Expected accuracy of guessing: every value is uniform and independent of the rest."""
        return 1.0 / self.num_values

    def length(self, gap):
        """Sequence length at `gap` noise tokens."""
        return 2 * self.num_pairs + gap + self.num_queries

    def min_distance(self, gap):
        """The smallest distance from a query to its key's value: the last pair, first query."""
        return gap + 1

    def sample(self, rng, batch_size, gap):
        """(inputs (B, length(gap)) int32, targets (B, num_queries) int32) from numpy `rng`."""
        keys = np.argsort(rng.random((batch_size, self.num_keys)), axis=1)[:, : self.num_pairs]
        values = rng.integers(0, self.num_values, (batch_size, self.num_pairs))
        pairs = np.stack([keys, self.num_keys + values], axis=-1).reshape(batch_size, -1)
        noise = self.num_keys + self.num_values + rng.integers(0, self.num_noise, (batch_size, gap))
        order = np.argsort(rng.random((batch_size, self.num_pairs)), axis=1)[:, : self.num_queries]
        queries = np.take_along_axis(keys, order, axis=1)
        inputs = np.concatenate([pairs, noise, queries], axis=1).astype("int32")
        return inputs, np.take_along_axis(values, order, axis=1).astype("int32")


class Batches(keras.utils.PyDataset):
    """`steps` training batches per epoch, new ones every epoch: batch i has gap
    `gaps[i % len(gaps)]` and is drawn with the numpy seed (seed, stream, e, i), e counting
    `on_epoch_end` calls (Keras also makes one before the first epoch). Distinct `stream`s give
    distinct batches."""

    def __init__(self, task, steps, batch_size, gaps, seed=0, stream=0, **kwargs):
        super().__init__(**kwargs)
        self.task, self.steps, self.batch_size = task, steps, batch_size
        self.gaps, self.seed, self.stream = list(gaps), seed, stream
        self.epoch = 0

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, self.stream, self.epoch, index))
        return self.task.sample(rng, self.batch_size, self.gaps[index % len(self.gaps)])

    def on_epoch_end(self):
        self.epoch += 1


def build_model(
    variant,
    task,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=128,
    feature_map="softmax_positive",
    num_random_features=64,
    causal_conv_kernel_size=2,
    causal_chunk_size=64,
    seed=0,
):
    """The recall model of one variant: (B, L) token ids -> (B, num_queries, num_values) logits.

    Token embeddings (no positions), `num_blocks` pre-LN causal `FavorTransformerDecoder` blocks
    (`attention_type="softmax"` for ``exact``), a final layer norm, then a Dense head over the
    values at the last `task.num_queries` positions (the queries).
    """
    _checks.one_of(variant, VARIANTS, "variant")
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(
        task.vocabulary_size,
        width,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02, seed=seed),
        name="embedding",
    )(token_ids)
    for i in range(num_blocks):
        x = FavorTransformerDecoder(
            intermediate_dim=intermediate_dim,
            num_heads=num_heads,
            activation="gelu",
            normalize_first=True,
            feature_map=feature_map,
            num_random_features=num_random_features,
            causal_chunk_size=causal_chunk_size,
            causal_conv_kernel_size=causal_conv_kernel_size,
            attention_type=ATTENTION_TYPES[variant],
            seed=seed * 1000 + i,  # a distinct seed per block
            name=f"decoder_{i}",
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    x = x[:, -task.num_queries :]  # (B, Q, E): the query positions
    logits = keras.layers.Dense(task.num_values, name="values")(x)
    return keras.Model(token_ids, logits, name=f"recall_{variant}")


def compile_model(model, steps, learning_rate):
    """AdamW with linear warm-up (10 % of the steps) then cosine decay, clipping, cross-entropy."""
    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), alpha=0.1, warmup_target=learning_rate, warmup_steps=warmup
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def evaluation_set(task, gap, num_sequences, seed=0):
    """The fixed evaluation sequences at `gap` (the same for every variant and run)."""
    return task.sample(np.random.default_rng((seed, 2**31, gap)), num_sequences, gap)


def accuracy(model, inputs, targets, batch_tokens):
    """The fraction of queries answered right, predicted in batches of about `batch_tokens`."""
    batch_size = max(1, batch_tokens // inputs.shape[1])
    right = 0
    for start in range(0, len(inputs), batch_size):
        logits = model.predict_on_batch(inputs[start : start + batch_size])
        right += int((np.argmax(logits, axis=-1) == targets[start : start + batch_size]).sum())
    return right / targets.size


def seconds_per_sequence(model, inputs, repeats=3):
    """Median wall time of `predict_on_batch` on one sequence (after a warm-up call)."""
    one = inputs[:1]
    model.predict_on_batch(one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(one)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_results(output_dir, results, settings):
    """Writes results.json, results.csv and results.md; returns their paths."""
    gaps = settings["eval_gaps"]
    columns = [
        "variant",
        *(f"accuracy_gap_{gap}" for gap in gaps),
        "train_seconds",
        "train_cpu_seconds",
        "seconds_per_step",
        f"inference_seconds_gap_{gaps[-1]}",
        "parameters",
    ]
    header = [
        f"Multi-query associative recall: {settings['num_pairs']} key-value pairs (keys from "
        f"{settings['num_keys']}, values from {settings['num_values']}), then `gap` noise tokens "
        f"(from {settings['num_noise']}), then {settings['num_queries']} queries; a query's "
        "answer lies at least gap + 1 positions back. Trained "
        f"{settings['steps']} steps of {settings['batch_size']} sequences with gaps "
        f"{settings['train_gaps']}"
        + (
            f" (first epoch: {settings['first_epoch_gaps']})"
            if settings["first_epoch_gaps"]
            else ""
        )
        + f"; width {settings['width']}, {settings['num_blocks']} blocks, "
        f"{settings['num_heads']} heads, causal convolution {settings['causal_conv_kernel_size']}, "
        f"FAVOR feature map `{settings['feature_map']}`, M = {settings['num_random_features']}. "
        f"Accuracy over {settings['eval_sequences']} x {settings['num_queries']} queries per gap; "
        f"chance {settings['chance']:.1%}. Exact attention is evaluated up to gap "
        f"{settings['exact_max_gap']} (—: not run). The whole run took "
        f"{settings['run_seconds']:.0f} s ({settings['run_cpu_seconds']:.0f} s of CPU time) on "
        f"{settings['cpu_count']} CPUs, {settings['backend']} backend.",
        "",
        "| attention | "
        + " | ".join(f"gap {gap} (length {settings['lengths'][i]})" for i, gap in enumerate(gaps))
        + " | train time (s) | train CPU time (s) | s/step "
        f"| inference, 1 sequence at gap {gaps[-1]} (s) |",
        "|---|" + "---|" * (len(gaps) + 4),
    ]

    def cell(value, form):
        return "—" if value is None else format(value, form)

    def row_line(row):
        accuracies = " | ".join(cell(row[f"accuracy_gap_{gap}"], ".1%") for gap in gaps)
        return (
            f"| {row['variant']} | {accuracies} | {row['train_seconds']:.0f} | "
            f"{row['train_cpu_seconds']:.0f} | {row['seconds_per_step']:.3f} | "
            f"{cell(row[f'inference_seconds_gap_{gaps[-1]}'], '.3f')} |"
        )

    return data.write_results_tables(output_dir, settings, results, columns, header, row_line)


def main(
    variants=VARIANTS,
    num_pairs=16,
    num_queries=16,
    num_keys=64,
    num_values=64,
    num_noise=64,
    train_gaps=(0, 16, 64, 128),
    first_epoch_gaps=(0, 16),
    eval_gaps=(128, 2048, 4096, 8192),
    exact_max_gap=8192,
    steps=1200,
    epochs=4,
    batch_size=32,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=128,
    feature_map="softmax_positive",
    num_random_features=64,
    causal_conv_kernel_size=2,
    causal_chunk_size=64,
    learning_rate=3e-3,
    redraw_every=None,
    eval_sequences=64,
    eval_batch_tokens=16384,
    output_dir=DEFAULT_OUTPUT_DIR,
    seed=0,
    verbose=1,
):
    """Trains each variant on short gaps with the same budget, evaluates at every gap, writes.

    Args:
        variants: "favor" and/or "exact".
        num_pairs, num_queries, num_keys, num_values, num_noise: the task (see `Task`); chance
            is 1 / num_values.
        train_gaps: the gaps of the training batches, in turn (batch i has gap
            train_gaps[i % len(train_gaps)]).
        first_epoch_gaps: None, or the gaps of the first epoch's batches instead of `train_gaps`
            (short ones: a curriculum).
        eval_gaps: the gaps evaluated after training; the answer to every query lies at least
            gap + 1 positions back.
        exact_max_gap: exact attention is evaluated at the gaps up to this one only (its time
            and memory grow with the square of the length).
        steps: optimizer steps per variant, split into `epochs` epochs, each followed by a
            validation pass at the longest training gap (the learning curve).
        batch_size: sequences per step.
        width, num_heads, num_blocks, intermediate_dim, causal_conv_kernel_size,
            causal_chunk_size: the model (`build_model`).
        feature_map, num_random_features: FAVOR's feature map (a name) and M.
        learning_rate: peak learning rate (linear warm-up, cosine decay).
        redraw_every: None (FAVOR's random features drawn once) or redraw them every this many
            steps during training (`RedrawRandomFeatures`).
        eval_sequences: sequences evaluated per gap (each with `num_queries` queries).
        eval_batch_tokens: tokens per evaluation batch (fewer sequences at longer gaps).
        output_dir: where the tables go.
        seed: seeds the data, the weights and the random features (the same for every variant).
        verbose: Keras progress bars (1) or quiet (0).

    Returns:
        A dict: "results" (one dict per variant), "settings", "paths".
    """
    for variant in variants:
        if variant not in VARIANTS:
            raise _checks.invalid("variants", f"names from {VARIANTS}", list(variants))
    start, start_cpu = time.perf_counter(), time.process_time()
    task = Task(num_pairs, num_queries, num_keys, num_values, num_noise)
    eval_gaps = sorted(eval_gaps)
    epochs = max(1, min(epochs, steps))
    steps_per_epoch = max(1, steps // epochs)
    total = steps_per_epoch * epochs
    validation = evaluation_set(task, max(train_gaps), 4 * batch_size, seed)
    eval_sets = {gap: evaluation_set(task, gap, eval_sequences, seed) for gap in eval_gaps}
    print(
        f"MQAR: {num_pairs} pairs, {num_queries} queries, chance {task.chance:.1%}; training "
        f"lengths {task.length(min(train_gaps))}-{task.length(max(train_gaps))}, evaluation "
        f"lengths {task.length(eval_gaps[0])}-{task.length(eval_gaps[-1])}"
    )
    results = []
    for variant in variants:
        keras.utils.set_random_seed(seed)
        model = build_model(
            variant,
            task,
            width=width,
            num_heads=num_heads,
            num_blocks=num_blocks,
            intermediate_dim=intermediate_dim,
            feature_map=feature_map,
            num_random_features=num_random_features,
            causal_conv_kernel_size=causal_conv_kernel_size,
            causal_chunk_size=causal_chunk_size,
            seed=seed,
        )
        compile_model(model, total, learning_rate)
        print(f"\n== {variant}: {data.trainable_parameters(model):,} parameters")
        begin, begin_cpu = time.perf_counter(), time.process_time()
        callbacks = []
        if redraw_every and variant == "favor":
            callbacks.append(RedrawRandomFeatures(every_n_steps=redraw_every, seed=seed))
        # The first epoch on `first_epoch_gaps` (when given), the others on `train_gaps`: two
        # `fit` calls of one schedule (the learning rate and redraws follow the optimizer's step).
        phases = [(train_gaps, epochs)]
        if first_epoch_gaps:
            phases.insert(0, (first_epoch_gaps, 1))
        history, done = {}, 0
        for stream, (gaps, until) in enumerate(phases):
            if until <= done:
                continue  # a single epoch: the first one only
            fitted = model.fit(
                Batches(task, steps_per_epoch, batch_size, gaps, seed, stream),
                initial_epoch=done,
                epochs=until,
                callbacks=callbacks,
                validation_data=validation,
                validation_batch_size=batch_size,
                verbose=verbose,
            )
            for name, values in fitted.history.items():
                history.setdefault(name, []).extend(values)
            done = until
        seconds = time.perf_counter() - begin
        row = {
            "variant": variant,
            "redraw_counts": [
                int(keras.ops.convert_to_numpy(layer.redraw_count))
                for callback in callbacks
                for layer in callback.redrawn_layers
            ],
            "train_seconds": seconds,
            "train_cpu_seconds": time.process_time() - begin_cpu,
            "seconds_per_step": seconds / total,
            "parameters": data.trainable_parameters(model),
        }
        for gap in eval_gaps:
            run = variant == "favor" or gap <= exact_max_gap
            inputs, targets = eval_sets[gap]
            row[f"accuracy_gap_{gap}"] = (
                accuracy(model, inputs, targets, eval_batch_tokens) if run else None
            )
            if gap == eval_gaps[-1]:
                row[f"inference_seconds_gap_{gap}"] = (
                    seconds_per_sequence(model, inputs) if run else None
                )
            if run:
                print(f"{variant}: gap {gap}, accuracy {row[f'accuracy_gap_{gap}']:.1%}")
        row["validation_accuracy"] = [float(v) for v in history["val_accuracy"]]
        row["loss"] = [float(v) for v in history["loss"]]
        results.append(row)
        print(f"{variant}: trained in {seconds:.0f} s")
    settings = {
        "variants": list(variants),
        "num_pairs": num_pairs,
        "num_queries": num_queries,
        "num_keys": num_keys,
        "num_values": num_values,
        "num_noise": num_noise,
        "chance": task.chance,
        "train_gaps": list(train_gaps),
        "first_epoch_gaps": None if first_epoch_gaps is None else list(first_epoch_gaps),
        "eval_gaps": eval_gaps,
        "lengths": [task.length(gap) for gap in eval_gaps],
        "exact_max_gap": exact_max_gap,
        "steps": total,
        "batch_size": batch_size,
        "width": width,
        "num_heads": num_heads,
        "num_blocks": num_blocks,
        "intermediate_dim": intermediate_dim,
        "feature_map": feature_map,
        "num_random_features": num_random_features,
        "causal_conv_kernel_size": causal_conv_kernel_size,
        "causal_chunk_size": causal_chunk_size,
        "learning_rate": learning_rate,
        "redraw_every": redraw_every,
        "eval_sequences": eval_sequences,
        "seed": seed,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
        "run_seconds": time.perf_counter() - start,
        "run_cpu_seconds": time.process_time() - start_cpu,
    }
    paths = write_results(output_dir, results, settings)
    with open(paths["results.md"]) as f:
        print("\n" + f.read())
    print("Wrote " + ", ".join(paths.values()))
    return {"results": results, "settings": settings, "paths": paths}


if __name__ == "__main__":
    main(
        **data.parse_main_arguments(
            main, types={"redraw_every": int}, choices={"variants": list(VARIANTS)}
        )
    )
