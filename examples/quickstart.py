"""Quickstart: a FAVOR+ Transformer language model, from training to TF Serving and TFLite.

Run from the repository root (a few minutes on 2 CPU cores):

    python examples/quickstart.py

What it does:

1. Loads a real corpus present on every machine: the Python standard library's own source code,
   as bytes (vocabulary 256), split by file into training and validation (`examples/data.py`).
2. Builds a small byte-level language model with the functional API: token embeddings, causal
   `FavorTransformerDecoder` blocks, a final layer norm and a Dense head over the 256 bytes. Each
   block decays its heads' causal state (reaches 16 to 64 bytes, well inside the training
   window) and mixes its input with a causal depthwise convolution of kernel 4 (local order);
   there are no position embeddings (NoPE), so nothing depends on the absolute position and any
   length works. `benchmarks/long_context.py` compares this with rotary positions, longer
   reaches and longer training windows: it is the configuration whose loss on long sequences
   is below that of the same bytes cut into 256-byte windows.
3. Trains it with Keras `fit` (progress bars) on 256-byte windows, with `RedrawRandomFeatures`
   redrawing the random features of every FAVOR layer halfway through training (the second half
   settles on the final draw); reports validation bits per byte.
4. Saves the `.keras` model and exports a SavedModel in the TF Serving layout
   (`saved_models/quickstart/1/`, signatures `serving_default`, `initial_state`, `decode_step`)
   and a builtin-ops-only TFLite model (`saved_models/quickstart.tflite`).
5. Runs a sequence of 8192 bytes through Keras, the SavedModel (loaded back with
   `tf.saved_model.load`, serving signature) and the TFLite model (LiteRT `Interpreter`, input
   resized to the sequence length), and checks that all three agree.
6. Scores validation sequences of 8192 bytes by position, against the same bytes cut into
   256-byte windows: prints the table by span (0-256, 256-1024, 1024-4096, 4096-8192) and
   writes the plot `examples/results/quickstart/position_loss.png`.
7. Generates a sample token by token with streaming decoding (`keras_favor.layers.decode_step`:
   constant cost per token, a fixed-size state), checks it against the full forward pass, and
   prints the sample and the timings.

Every setting is an argument of `main` (and a command-line option: `--help`).
"""

import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_favor  # noqa: E402
from examples import data  # noqa: E402
from keras_favor.layers import (  # noqa: E402
    FavorTransformerDecoder,
    TokenAndPositionEmbedding,
    decode_step,
    initial_decode_state,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "saved_models", "quickstart")
DEFAULT_RESULTS = os.path.join(REPO_ROOT, "examples", "results", "quickstart")
DEFAULT_PROMPT = "import os\n\n\nclass "


def build_model(
    width=128,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=512,
    num_random_features=64,
    feature_map="softmax_positive",
    causal_chunk_size=128,
    dropout=0.0,
    decay=None,
    causal_conv_kernel_size=None,
    use_rotary_embedding=True,
    attention_type="favor",
    seed=0,
):
    """A byte-level causal FAVOR+ Transformer language model (functional API).

    token_ids (B, L) int32 -> token embeddings (B, L, E) -> `num_blocks` pre-LN
    `FavorTransformerDecoder` blocks with rotary position embeddings -> LayerNorm -> Dense logits
    (B, L, 256). Any length L works: rotary embeddings have no table to outgrow. `decay`,
    `causal_conv_kernel_size`, `use_rotary_embedding` and `attention_type` are the blocks'
    arguments: `attention_type="softmax"` gives the same model with exact softmax attention
    (the same weights; it takes no `decay`), the reference FAVOR is compared with.
    """
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(
        data.VOCABULARY_SIZE,
        None,
        width,
        position_embedding_type=None,  # positions come from RoPE inside the blocks
        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02, seed=seed),
        name="embedding",
    )(token_ids)
    for i in range(num_blocks):
        x = FavorTransformerDecoder(
            intermediate_dim=intermediate_dim,
            num_heads=num_heads,
            dropout=dropout,
            activation="gelu",
            normalize_first=True,
            feature_map=feature_map,
            num_random_features=num_random_features,
            causal_chunk_size=causal_chunk_size,
            use_rotary_embedding=use_rotary_embedding,
            decay=decay,
            causal_conv_kernel_size=causal_conv_kernel_size,
            attention_type=attention_type,
            seed=seed * 1000 + i,  # a distinct seed per block
            name=f"decoder_{i}",
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(data.VOCABULARY_SIZE, name="logits")(x)
    return keras.Model(token_ids, logits, name="favor_byte_lm")


def compile_model(model, steps, learning_rate=2e-3, warmup_steps=None):
    """Adam with linear warm-up then cosine decay, gradient clipping, next-byte cross-entropy."""
    warmup_steps = max(1, steps // 20) if warmup_steps is None else warmup_steps
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, steps - warmup_steps),
        alpha=0.1,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def train(
    model,
    corpus,
    steps,
    batch_size,
    sequence_length,
    epochs=1,
    learning_rate=2e-3,
    redraw_every=None,
    validation_windows=32,
    long_steps=0,
    long_sequence_length=2048,
    seed=0,
    verbose=1,
):
    """Trains `model` on random windows of the corpus.

    `steps` optimizer steps on `sequence_length`-byte windows in `epochs` epochs, then (if
    `long_steps`) one more epoch of `long_steps` steps on `long_sequence_length`-byte windows,
    as many bytes per step (fewer windows): the model learns fast on short windows and then
    adapts to long contexts, which FAVOR processes at the same cost per byte. The validation
    loss after each epoch is on the same `sequence_length`-byte windows. The random features are
    redrawn by `RedrawRandomFeatures(every_n_steps=redraw_every)` when `redraw_every` is set.

    Returns:
        (dict "loss" / "val_loss" -> one value per epoch, the `RedrawRandomFeatures` callback or
        None).
    """
    epochs = max(1, min(epochs, steps))
    steps_per_epoch = max(1, steps // epochs)
    compile_model(model, steps_per_epoch * epochs + long_steps, learning_rate)
    val_x, val_y = data.validation_windows(corpus.validation, sequence_length, validation_windows)
    redraw = None
    if redraw_every:
        redraw = keras_favor.RedrawRandomFeatures(every_n_steps=redraw_every, seed=seed)
    phases = [
        (
            data.RandomWindows(corpus.train, sequence_length, batch_size, steps_per_epoch, seed),
            0,
            epochs,
        )
    ]
    if long_steps:
        long_batch = max(1, batch_size * sequence_length // long_sequence_length)
        long_data = data.RandomWindows(
            corpus.train, long_sequence_length, long_batch, long_steps, seed + 1
        )
        phases.append((long_data, epochs, epochs + 1))
    history = {"loss": [], "val_loss": []}
    for train_data, initial_epoch, last_epoch in phases:
        if initial_epoch and verbose:
            print(
                f"Adapting to long contexts: {train_data.batch_size} x "
                f"{train_data.length}-byte windows per step"
            )
        result = model.fit(
            train_data,
            epochs=last_epoch,
            initial_epoch=initial_epoch,
            validation_data=(val_x, val_y),
            validation_batch_size=batch_size,
            callbacks=[redraw] if redraw else [],
            verbose=verbose,
        )
        for key in history:
            history[key] += [float(v) for v in result.history[key]]
    return history, redraw


def long_sequence(corpus, length):
    """The first `length + 1` validation bytes (repeated if the split is shorter), (1, L) each."""
    tokens = corpus.validation
    if tokens.size < length + 1:
        tokens = np.tile(tokens, (length + 1) // tokens.size + 1)
    chunk = tokens[: length + 1].astype("int32")
    return chunk[None, :-1], chunk[None, 1:]


SPANS = ((0, 256), (256, 1024), (1024, 4096), (4096, 8192))


def token_losses(logits, targets):
    """Next-byte cross-entropy in nats of every position: numpy logits (..., V), targets (...)."""
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits).sum(axis=-1))
    return log_norm - np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]


def position_losses(model, corpus, length=8192, window=256, num_sequences=4, batch_size=8):
    """Bits per byte by position on `num_sequences` validation sequences of `length` bytes.

    The sequences are spread evenly over the validation split. The same bytes are also cut into
    `window`-byte windows, each predicted on its own, so that the two curves score the same
    targets: the first with all the context before each byte, the second with at most `window`
    bytes of it.

    Returns:
        (bits per byte by position, (length,), with the whole sequence as context; the same with
        `window`-byte windows as context).
    """
    ids, targets = data.validation_windows(corpus.validation, length, num_sequences)
    full = token_losses(model.predict(ids, batch_size=1, verbose=0), targets)
    cut = ids.shape[0] * length // window
    windowed_logits = model.predict(ids.reshape(cut, window), batch_size=batch_size, verbose=0)
    windowed = token_losses(windowed_logits, targets.reshape(cut, window))
    to_bits = 1 / np.log(2)
    return full.mean(axis=0) * to_bits, windowed.reshape(ids.shape).mean(axis=0) * to_bits


def span_table(full, windowed, spans=SPANS):
    """Rows (start, end, bits per byte with full context, with windows, ratio) of each span
    inside the curves' length, then the whole sequence."""
    rows = [
        (start, end, float(full[start:end].mean()), float(windowed[start:end].mean()))
        for start, end in spans
        if end <= full.size
    ]
    rows.append((0, full.size, float(full.mean()), float(windowed.mean())))
    return [(start, end, f, w, f / w) for start, end, f, w in rows]


def format_span_table(rows, window=256):
    """The span table as text, one line per span."""
    lines = [f"  {'bytes':>11}  {'full context':>12}  {f'{window}-byte windows':>17}  {'ratio':>6}"]
    for start, end, full, windowed, ratio in rows:
        lines.append(f"  {f'{start}-{end}':>11}  {full:12.3f}  {windowed:17.3f}  {ratio:6.3f}")
    return "\n".join(lines)


def plot_position_losses(path, curves, window=256, title=None):
    """Writes a PNG of bits per byte by position (log x), one line per `curves` name -> array,
    each smoothed over `window` positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        kernel = np.ones(window) / window
        smooth = np.convolve(curve, kernel, mode="valid")
        axes.plot(np.arange(smooth.size) + window, smooth, label=name)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("position (bytes), mean over the preceding window")
    axes.set_ylabel("bits per byte")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_saved_model(saved_model_dir, token_ids):
    """Runs the `serving_default` signature of a SavedModel loaded with `tf.saved_model.load`."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    serve = loaded.signatures["serving_default"]
    return serve(token_ids=tf.constant(token_ids))["logits"].numpy()


def run_tflite(tflite_path, token_ids, num_threads=None):
    """Runs the `serving_default` signature of a `.tflite` model with LiteRT's `Interpreter`.

    The model was converted with a dynamic sequence length: the input tensor is resized to this
    sequence's shape (the signature runner calls `resize_tensor_input` and `allocate_tensors`
    for every input whose shape changed) before running.
    """
    from ai_edge_litert.interpreter import Interpreter

    kwargs = {"num_threads": num_threads} if num_threads else {}
    interpreter = Interpreter(model_path=tflite_path, **kwargs)
    runner = interpreter.get_signature_runner("serving_default")
    return runner(token_ids=np.asarray(token_ids, dtype=np.int32))["logits"]


def make_decode_step(model):
    """`decode_step` over the whole model, compiled as one TF graph on the TensorFlow backend."""

    def step(token, position, state):
        return decode_step(model, token, position, state)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(step, autograph=False)
    return step


def generate(model, prompt_ids, num_tokens, temperature=0.8, seed=0):
    """Streams the prompt, then samples `num_tokens` bytes, one `decode_step` per token.

    Returns:
        (generated ids (num_tokens,), logits of every step (len(prompt) + num_tokens - 1, V)):
        the logits at position t predict token t + 1, as the full forward's would.
    """
    rng = np.random.default_rng(seed)
    step = make_decode_step(model)
    state = initial_decode_state(model, batch_size=1)
    token = np.asarray(prompt_ids[:1], dtype="int32")
    generated, all_logits = [], []
    total = len(prompt_ids) + num_tokens - 1
    for position in range(total):
        logits, state = step(token, np.asarray([position], dtype="int32"), state)
        logits = keras.ops.convert_to_numpy(logits)[0].astype("float64")
        all_logits.append(logits)
        if position + 1 < len(prompt_ids):
            next_id = int(prompt_ids[position + 1])
        else:
            scaled = (logits - logits.max()) / max(temperature, 1e-6)
            probs = np.exp(scaled)
            next_id = int(rng.choice(probs.size, p=probs / probs.sum()))
            generated.append(next_id)
        token = np.asarray([next_id], dtype="int32")
    return np.asarray(generated, dtype="int32"), np.stack(all_logits)


@contextlib.contextmanager
def timed(timings, name):
    """Records the wall-clock seconds of the `with` block in `timings[name]`."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def main(
    steps=1500,
    epochs=4,
    batch_size=16,
    sequence_length=256,
    width=128,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=512,
    num_random_features=64,
    decay=True,
    shortest_reach=16,
    longest_reach=64,
    causal_conv_kernel_size=4,
    rotary=False,
    learning_rate=2e-3,
    redraw_every=750,
    validation_windows=64,
    long_steps=0,
    long_sequence_length=2048,
    max_train_bytes=None,
    max_validation_bytes=None,
    long_length=8192,
    num_long_sequences=4,
    comparison_window=256,
    sample_length=400,
    prompt=DEFAULT_PROMPT,
    temperature=0.8,
    tolerance=1e-3,
    output=DEFAULT_OUTPUT,
    tflite_path=None,
    results_dir=DEFAULT_RESULTS,
    seed=0,
    verbose=1,
):
    """Trains, exports, checks and samples the quickstart model; returns a dict of results.

    Args:
        steps: optimizer steps in total.
        epochs: the steps are split into this many epochs, each followed by a validation pass.
        batch_size, sequence_length: training windows per step and their length in bytes.
        width, num_heads, num_blocks, intermediate_dim, num_random_features: the model's size.
        decay: decay each head's causal FAVOR state, at the rates
            `keras_favor.ops.decay_rates(num_heads, shortest_reach, longest_reach)`.
        shortest_reach, longest_reach: the reaches (1 / (1 − γ) positions) of the fastest and
            the slowest head; `longest_reach` 0 means the longest training window, so that no
            head reaches further than training showed it.
        causal_conv_kernel_size: a causal depthwise convolution over this many positions before
            each block's query, key and value projections (0: none).
        rotary: rotary position embeddings (RoPE) in every block.
        learning_rate: peak learning rate (linear warm-up, cosine decay).
        redraw_every: redraw the random features every this many steps (0 or None: never).
            The default redraws once, before step 750 of 1500 (counted from 0), and leaves the
            second half to settle on the final features: a redraw costs what the steps after it
            cannot recover, so late redraws cost most (docs/examples.md has the schedules
            measured).
        validation_windows: how many validation windows (spread over the split) the bits per
            byte use.
        long_steps, long_sequence_length: a last epoch of `long_steps` steps on windows of
            `long_sequence_length` bytes (as many bytes per step), so that the model adapts to
            long contexts; 0 (the default) skips it.
        max_train_bytes, max_validation_bytes: cap the corpus (None: the whole stdlib source).
        long_length: the length of the sequence run through Keras, SavedModel and TFLite, and of
            the validation sequences scored by position.
        num_long_sequences: how many `long_length`-byte validation sequences (spread over the
            split) the loss by position averages.
        comparison_window: the same bytes are also scored cut into windows of this many bytes;
            the table by span compares the two.
        sample_length: bytes to generate with streaming decoding.
        prompt: the text the sample starts from.
        temperature: sampling temperature.
        tolerance: the largest |logit difference| accepted between Keras and the exports.
        output: the SavedModel base directory (TF Serving `--model_base_path`); the model goes
            into `<output>/1/`, the `.keras` file to `<output>.keras`.
        tflite_path: the `.tflite` file (default `<output>.tflite`).
        results_dir: where the loss-by-position plot (`position_loss.png`) and table
            (`position_loss.json`) go.
        seed: seeds weights, random features, data order and sampling.
        verbose: 1 shows Keras progress bars, 0 is quiet (the summary is printed either way).

    Returns:
        A dict with the training history, validation bits per byte, the export paths, the
        largest differences between Keras and the exports, the sample and the timings (s).
    """
    from keras_favor import export
    from keras_favor.export.saved_model import saved_model_signature_names

    keras.utils.set_random_seed(seed)
    timings = {}
    output = os.path.abspath(output)
    tflite_path = os.path.abspath(tflite_path or output + ".tflite")
    keras_path = output + ".keras"

    with timed(timings, "load corpus"):
        corpus = data.load_corpus(max_train_bytes, max_validation_bytes)
    print(f"Corpus: Python {sys.version.split()[0]} standard library source, {corpus}")

    longest_window = long_sequence_length if long_steps else sequence_length
    rates = None
    if decay:
        rates = keras_favor.ops.decay_rates(
            num_heads, shortest_reach, longest_reach or longest_window
        )
    model = build_model(
        width=width,
        num_heads=num_heads,
        num_blocks=num_blocks,
        intermediate_dim=intermediate_dim,
        num_random_features=num_random_features,
        decay=rates,
        causal_conv_kernel_size=causal_conv_kernel_size or None,
        use_rotary_embedding=rotary,
        seed=seed,
    )
    options = [f"{num_random_features} random features", "rotary positions" if rotary else "NoPE"]
    if rates:
        reaches = ", ".join(f"{1 / (1 - g):.0f}" for g in rates)
        options.append(f"state decay (reaches {reaches} bytes)")
    if causal_conv_kernel_size:
        options.append(f"causal convolution of kernel {causal_conv_kernel_size}")
    print(
        f"Model: {num_blocks} FavorTransformerDecoder blocks, width {width}, {num_heads} heads, "
        f"{', '.join(options)}; {data.trainable_parameters(model):,} trainable parameters"
    )
    with timed(timings, "train"):
        history, redraw = train(
            model,
            corpus,
            steps,
            batch_size,
            sequence_length,
            epochs=epochs,
            learning_rate=learning_rate,
            redraw_every=redraw_every,
            validation_windows=validation_windows,
            long_steps=long_steps,
            long_sequence_length=long_sequence_length,
            seed=seed,
            verbose=verbose,
        )
    losses, val_losses = history["loss"], history["val_loss"]
    val_bpb = data.bits_per_byte(val_losses[-1])
    redraws = [
        int(keras.ops.convert_to_numpy(layer.redraw_count))
        for layer in (redraw.redrawn_layers if redraw else [])
    ]
    print(
        f"Validation: {val_bpb:.3f} bits per byte"
        + (f" (random features redrawn {redraws[0]} times per layer)" if redraws else "")
    )

    with timed(timings, "save .keras"):
        os.makedirs(os.path.dirname(output), exist_ok=True)
        model.save(keras_path)
    with timed(timings, "export SavedModel"):
        saved_model_dir = export.export_saved_model(model, output, version=1, overwrite=True)
    with timed(timings, "export TFLite"):
        export.export_tflite(saved_model_dir, tflite_path)
    print(
        f"Saved {keras_path}\nExported {saved_model_dir} (signatures: "
        f"{', '.join(saved_model_signature_names(saved_model_dir))})\n"
        f"Exported {tflite_path} ({os.path.getsize(tflite_path) / 2**20:.1f} MiB)"
    )

    # One long sequence through Keras, the SavedModel and the TFLite model.
    long_ids, long_targets = long_sequence(corpus, long_length)
    with timed(timings, f"Keras forward, {long_length} tokens"):
        keras_logits = keras.ops.convert_to_numpy(model.predict(long_ids, verbose=0))
    with timed(timings, f"SavedModel load + forward, {long_length} tokens"):
        saved_model_logits = run_saved_model(saved_model_dir, long_ids)
    with timed(timings, f"TFLite load + forward, {long_length} tokens"):
        tflite_logits = run_tflite(tflite_path, long_ids)
    differences = {
        "saved_model": float(np.max(np.abs(saved_model_logits - keras_logits))),
        "tflite": float(np.max(np.abs(tflite_logits - keras_logits))),
    }
    long_bpb = {
        name: data.bits_per_byte(data.cross_entropy(logits, long_targets))
        for name, logits in (
            ("keras", keras_logits),
            ("saved_model", saved_model_logits),
            ("tflite", tflite_logits),
        )
    }
    print(
        f"\n{long_length}-byte validation sequence, bits per byte: "
        + ", ".join(f"{name} {value:.4f}" for name, value in long_bpb.items())
    )
    print(
        "Largest |logit difference| from Keras: "
        + ", ".join(f"{name} {value:.2e}" for name, value in differences.items())
    )
    bad = {name: value for name, value in differences.items() if not value <= tolerance}
    if bad:
        raise RuntimeError(f"Exported models disagree with Keras beyond {tolerance}: {bad}")

    # The loss by position: does the context help?
    with timed(timings, f"loss by position, {num_long_sequences} x {long_length} tokens"):
        full_curve, windowed_curve = position_losses(
            model, corpus, long_length, comparison_window, num_long_sequences
        )
    spans = span_table(full_curve, windowed_curve)
    print(
        f"\nBits per byte by span of {full_curve.size}-byte validation sequences (mean of "
        f"{num_long_sequences}), with the whole sequence as context and with the same bytes cut "
        f"into {comparison_window}-byte windows:\n" + format_span_table(spans, comparison_window)
    )
    os.makedirs(results_dir, exist_ok=True)
    plot_path = plot_position_losses(
        os.path.join(results_dir, "position_loss.png"),
        {
            "whole sequence as context": full_curve,
            f"cut into {comparison_window}-byte windows": windowed_curve,
        },
        window=comparison_window,
        title=f"Quickstart model, validation loss by position\n{', '.join(options)}",
    )
    table_path = os.path.join(results_dir, "position_loss.json")
    with open(table_path, "w") as f:
        json.dump(
            {
                "options": options,
                "steps": steps,
                "validation_bits_per_byte": val_bpb,
                "spans": [
                    dict(zip(("start", "end", "full", "windowed", "ratio"), row)) for row in spans
                ],
            },
            f,
            indent=2,
        )
    print(f"Wrote {plot_path} and {table_path}")

    # Streaming generation: one decode_step per token, a fixed-size state.
    prompt_ids = data.encode(prompt)
    with timed(timings, f"streaming decode, {len(prompt_ids) + sample_length - 1} tokens"):
        generated, step_logits = generate(
            model, prompt_ids, sample_length, temperature=temperature, seed=seed
        )
    full_ids = np.concatenate([prompt_ids, generated])[None, :-1]
    full_logits = keras.ops.convert_to_numpy(model.predict(full_ids, verbose=0))[0]
    decode_difference = float(np.max(np.abs(step_logits - full_logits)))
    sample = data.decode(np.concatenate([prompt_ids, generated]))
    state_floats = sum(
        int(np.prod(t.shape)) for pair in initial_decode_state(model, 1) for t in pair
    )
    print(
        f"Streaming decode equals the full forward: max |difference| {decode_difference:.2e} "
        f"(state: {state_floats:,} floats, whatever the length)"
    )
    if not decode_difference <= tolerance:
        raise RuntimeError(f"Streaming decode differs from the full forward: {decode_difference}")
    print("\nSample (prompt + streamed bytes):\n" + "-" * 72 + f"\n{sample}\n" + "-" * 72)

    decode_key = next(k for k in timings if k.startswith("streaming decode"))
    print("\nTimings:")
    for name, seconds in timings.items():
        print(f"  {name:<42} {seconds:8.2f} s")
    print(
        f"  {'training throughput':<42} "
        f"{(steps + long_steps) * batch_size * sequence_length / timings['train']:8.0f}"
        " tokens/s"
    )
    print(
        f"  {'streaming decode':<42} "
        f"{1000 * timings[decode_key] / (len(prompt_ids) + sample_length - 1):8.2f}"
        " ms/token"
    )
    print(
        f"\nServe it: tensorflow_model_server --rest_api_port=8501 --model_name=quickstart "
        f"--model_base_path={output}"
    )
    return {
        "history": {"loss": losses, "val_loss": val_losses},
        "validation_bits_per_byte": val_bpb,
        "long_sequence_bits_per_byte": long_bpb,
        "spans": spans,
        "position_loss_plot": plot_path,
        "differences": differences,
        "decode_difference": decode_difference,
        "redraw_counts": redraws,
        "sample": sample,
        "saved_model_dir": saved_model_dir,
        "tflite_path": tflite_path,
        "keras_path": keras_path,
        "timings": dict(timings),
        "num_parameters": data.trainable_parameters(model),
    }


if __name__ == "__main__":
    main(
        **data.parse_main_arguments(
            main,
            types={"max_train_bytes": int, "max_validation_bytes": int},
            helps={
                "steps": "optimizer steps in total",
                "redraw_every": "steps between redraws (0: never)",
                "long_length": "length of the sequence run through Keras, SavedModel and TFLite",
                "output": "SavedModel base directory: the model goes to <output>/1/",
                "tflite_path": "the .tflite file (None: <output>.tflite)",
            },
        )
    )
