"""Every example's `main()` runs end to end with tiny settings and produces what it promises.

Tiny models (width 16, one or two blocks) and a few optimizer steps: each test takes seconds. The
quickstart test still runs an 8192-token sequence through Keras, the SavedModel and the TFLite
model. Examples that export need the TensorFlow backend; the others run on any backend.
"""

import json
import math
import os

import keras
import numpy as np
import pytest

from examples import char_lm, data, long_classification, long_recall
from keras_favor import feature_maps, ops
from keras_favor.layers import FavorTransformerDecoder

tf_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="export needs the TensorFlow backend"
)

TINY_LM = dict(width=16, num_heads=2, num_blocks=1, intermediate_dim=32, num_random_features=16)
TINY_CORPUS = dict(max_train_bytes=100_000)


def finite(values):
    return all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------------
# examples/data.py


def test_corpus_is_deterministic_and_split_by_file():
    first = data.load_corpus(60_000, 20_000)
    second = data.load_corpus(60_000, 20_000)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.validation, second.validation)
    assert first.train.size == 60_000 and first.validation.size == 20_000
    files = data.stdlib_source_files()
    assert files == sorted(files, key=lambda p: os.path.relpath(p, data.stdlib_dir()))
    # Training reads files 0, 1, ..., 8, 10, ...; validation reads every 10th: 9, 19, ...
    with open(files[0], "rb") as f:
        text = f.read() + b"\n\n"
    with open(files[1], "rb") as f:
        text += f.read()
    np.testing.assert_array_equal(first.train[: len(text)], np.frombuffer(text, np.uint8))
    with open(files[data.VALIDATION_EVERY - 1], "rb") as f:
        head = np.frombuffer(f.read()[:200], np.uint8)
    np.testing.assert_array_equal(first.validation[: head.size], head)


def test_windows_targets_are_the_next_bytes():
    tokens = np.arange(100, dtype=np.uint8)
    x, y = data.windows(tokens, np.array([0, 10]), 5)
    np.testing.assert_array_equal(x[1], [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(y[1], [11, 12, 13, 14, 15])
    vx, _ = data.validation_windows(tokens, 9, max_windows=3)  # 11 fit; 3 spread over them
    np.testing.assert_array_equal(vx[:, 0], [0, 27, 63])
    assert data.validation_windows(tokens, 9)[0].shape == (11, 9)
    with pytest.raises(ValueError, match="length"):
        data.validation_windows(tokens, 100)


def test_random_windows_are_reproducible_and_change_per_epoch():
    tokens = np.arange(1000, dtype=np.int64) % 256
    a = data.RandomWindows(tokens, 8, 4, steps=3, seed=1)
    b = data.RandomWindows(tokens, 8, 4, steps=3, seed=1)
    np.testing.assert_array_equal(a[2][0], b[2][0])
    first = a[0][0]
    a.on_epoch_end()
    assert not np.array_equal(first, a[0][0])
    assert data.decode(data.encode("héllo")) == "héllo"
    assert data.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    logits = np.log(np.array([[0.5, 0.25, 0.25]]))
    assert data.cross_entropy(logits, np.array([0])) == pytest.approx(math.log(2))


# ------------------------------------------------------------------------------------------------
# examples/quickstart.py


@pytest.mark.slow
@tf_only
def test_quickstart(tmp_path):
    from examples import quickstart

    output = str(tmp_path / "saved_models" / "quickstart")
    result = quickstart.main(
        steps=12,
        epochs=2,
        batch_size=4,
        sequence_length=64,
        learning_rate=1e-2,
        redraw_every=4,
        validation_windows=4,
        long_steps=2,  # the long-context epoch: 2 steps of 2 x 128 bytes
        long_sequence_length=128,
        max_validation_bytes=20_000,
        long_length=8192,
        num_long_sequences=2,
        sample_length=8,
        decay=True,
        causal_conv_kernel_size=4,
        output=output,
        results_dir=str(tmp_path / "results"),
        verbose=0,
        **TINY_LM,
        **TINY_CORPUS,
    )
    assert os.path.isfile(os.path.join(output, "1", "saved_model.pb"))
    assert result["saved_model_dir"] == os.path.join(output, "1")
    assert os.path.getsize(output + ".tflite") > 0 and os.path.isfile(output + ".keras")
    losses = result["history"]["loss"]
    assert len(losses) == 3  # two epochs on short windows, one on long windows
    assert finite(losses + result["history"]["val_loss"]) and losses[-1] < losses[0]
    assert math.isfinite(result["validation_bits_per_byte"])
    assert result["redraw_counts"] == [3]  # 14 steps, every 4
    # The 8192-token sequence gives the same logits in Keras, the SavedModel and TFLite.
    assert result["differences"]["saved_model"] < 1e-4
    assert result["differences"]["tflite"] < 1e-4
    bpb = result["long_sequence_bits_per_byte"]
    assert bpb["tflite"] == pytest.approx(bpb["keras"], abs=1e-4)
    assert result["decode_difference"] < 1e-4
    assert result["sample"].startswith(quickstart.DEFAULT_PROMPT)
    assert set(result["timings"]) >= {"train", "export SavedModel", "export TFLite"}
    # The table by span (0-256, 256-1024, 1024-4096, 4096-8192, then the whole), and the plot.
    spans = [(start, end) for start, end, *_ in result["spans"]]
    assert spans == [*quickstart.SPANS, (0, 8192)]
    assert all(math.isfinite(value) for row in result["spans"] for value in row[2:])
    assert result["position_loss_plot"] == str(tmp_path / "results" / "position_loss.png")
    assert os.path.getsize(result["position_loss_plot"]) > 0
    with open(tmp_path / "results" / "position_loss.json") as f:
        table = json.load(f)
    assert [row["ratio"] for row in table["spans"]] == [row[4] for row in result["spans"]]


@tf_only  # eager JAX runs the chunked causal loop op by op: slow, and nothing backend-specific
@pytest.mark.parametrize("options", [{}, {"decay": [0.9, 0.99], "causal_conv_kernel_size": 4}])
def test_position_losses_equal_windows_within_the_first_window(options):
    from examples import quickstart

    corpus = data.load_corpus(max_train_bytes=100_000, max_validation_bytes=20_000)
    model = quickstart.build_model(**TINY_LM, **options)
    full, windowed = quickstart.position_losses(model, corpus, 512, 64, num_sequences=3)
    assert full.shape == windowed.shape == (512,)
    # Causal: the first window sees the same bytes either way; later bytes see more context.
    np.testing.assert_allclose(full[:64], windowed[:64], rtol=1e-4, atol=1e-5)
    assert np.abs(full[64:] - windowed[64:]).max() > 1e-4
    rows = quickstart.span_table(full, windowed)
    assert [(start, end) for start, end, *_ in rows] == [(0, 256), (0, 512)]  # spans that fit
    start, end, full_bits, windowed_bits, ratio = rows[-1]
    assert full_bits == pytest.approx(full.mean()) and ratio == pytest.approx(
        full_bits / windowed_bits
    )


@tf_only  # eager JAX runs the chunked causal loop op by op: slow, and nothing backend-specific
def test_quickstart_model_takes_long_sequences():
    from examples import quickstart

    model = quickstart.build_model(**TINY_LM)
    logits = model(np.zeros((1, 8200), "int32"))  # rotary positions: no length limit
    assert tuple(logits.shape) == (1, 8200, data.VOCABULARY_SIZE)


def test_quickstart_model_with_exact_attention():
    from examples import quickstart

    favor = quickstart.build_model(**TINY_LM, causal_conv_kernel_size=4)
    exact = quickstart.build_model(**TINY_LM, causal_conv_kernel_size=4, attention_type="softmax")
    blocks = [layer for layer in exact.layers if hasattr(layer, "attention_type")]
    assert [block.attention_type for block in blocks] == ["softmax"]
    # The same trainable weights (FAVOR adds only its non-trainable random features).
    shapes = [tuple(w.shape) for w in exact.trainable_weights]
    assert shapes == [tuple(w.shape) for w in favor.trainable_weights]
    # Causal: changing bytes 8.. leaves the logits of positions 0..7 exactly as they were.
    ids = np.random.default_rng(0).integers(0, 256, (1, 12)).astype("int32")
    changed = ids.copy()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    before, after = (keras.ops.convert_to_numpy(exact(x)) for x in (ids, changed))
    np.testing.assert_allclose(before[:, :8], after[:, :8], rtol=0, atol=1e-6)
    assert np.abs(before[:, 8:] - after[:, 8:]).max() > 1e-4
    with pytest.raises(ValueError, match="decay"):
        quickstart.build_model(**TINY_LM, decay=[0.9, 0.99], attention_type="softmax")


# ------------------------------------------------------------------------------------------------
# examples/char_lm.py


def decoder_blocks(model):
    return [layer for layer in model.layers if isinstance(layer, FavorTransformerDecoder)]


@pytest.mark.parametrize("variant", list(char_lm.VARIANTS))
def test_char_lm_builds_each_variant_with_its_options(variant):
    spec = char_lm.VARIANTS[variant]
    model = char_lm.build_model(variant, hedgehog_feature_dim=5, **TINY_LM)
    embedding = model.get_layer("embedding")
    expected_positions = "sine" if spec.positions == "sine" else None
    assert embedding.position_embedding_type == expected_positions
    blocks = decoder_blocks(model)
    if spec.attention == "exact":
        assert not blocks
        assert isinstance(model.get_layer("decoder_0_attention"), keras.layers.MultiHeadAttention)
    else:
        assert len(blocks) == TINY_LM["num_blocks"]
    parameters = data.trainable_parameters(model)
    plain = data.trainable_parameters(char_lm.build_model("exact", **TINY_LM))
    for block in blocks:
        config = block.get_config()
        assert config["attention_type"] == ("softmax" if spec.attention == "softmax" else "favor")
        assert config["use_rotary_embedding"] == (spec.positions == "rotary")
        assert config["causal_conv_kernel_size"] == spec.causal_conv_kernel_size
        if spec.decay_reaches:
            rates = config["decay"]
            assert rates == pytest.approx(
                ops.decay_rates(TINY_LM["num_heads"], *spec.decay_reaches)
            )
            assert [round(1 / (1 - g)) for g in (rates[0], rates[-1])] == list(spec.decay_reaches)
        else:
            assert config["decay"] is None
        if spec.package_defaults:  # every attention option is the block's own default
            defaults = FavorTransformerDecoder(intermediate_dim=8, num_heads=2).get_config()
            for key in ("feature_map", "num_random_features", "orthogonal", "row_norms"):
                assert config[key] == defaults[key]
            if variant == "favor_default":  # the convolution too
                assert config["causal_conv_kernel_size"] == defaults["causal_conv_kernel_size"]
            assert config["num_random_features"] != TINY_LM["num_random_features"]
        elif spec.attention == "favor":
            assert config["num_random_features"] == TINY_LM["num_random_features"]
            expected_map = feature_maps.get(
                feature_maps.Hedgehog(5) if spec.feature_map == "hedgehog" else spec.feature_map
            )
            assert config["feature_map"] == feature_maps.serialize(expected_map)
    # Equal budgets: only the convolution (kernel K x E and bias E per block) and the learnable
    # map (per block, query and key: kernel H x F' and bias F' per head) add parameters.
    extra = 0
    if spec.causal_conv_kernel_size:
        extra += TINY_LM["num_blocks"] * (spec.causal_conv_kernel_size + 1) * TINY_LM["width"]
    if spec.feature_map == "hedgehog":
        key_dim = TINY_LM["width"] // TINY_LM["num_heads"]
        extra += TINY_LM["num_blocks"] * 2 * TINY_LM["num_heads"] * (key_dim + 1) * 5
    assert parameters == plain + extra


TINY_TRAINING = dict(
    steps=8,
    evaluations=2,
    batch_size=4,
    sequence_length=32,
    learning_rate=1e-2,
    redraw_every=2,
    validation_windows=4,
    hedgehog_feature_dim=5,
    max_validation_bytes=20_000,
    verbose=0,
    **TINY_LM,
    **TINY_CORPUS,
)
# Exact (and its conversion to the learnable map), the package's defaults, and FAVOR with decay,
# convolution and RoPE; `test_char_lm_builds_each_variant_with_its_options` builds every variant.
CHAR_LM_TESTED = ("exact", "favor_default", "favor_hyperbolic_decay_conv_rope")


@pytest.mark.slow
def test_char_lm(tmp_path):
    result = char_lm.main(
        variants=CHAR_LM_TESTED,
        convert_steps=3,
        convert_local_windows=(None, 2),
        output_dir=str(tmp_path),
        **TINY_TRAINING,
    )
    rows = {row["variant"]: row for row in result["results"]}
    windowed = char_lm.converted_name(2)
    assert windowed == "exact_to_hedgehog_window2"
    assert list(rows) == ["exact", char_lm.CONVERTED, windowed, *CHAR_LM_TESTED[1:]]
    for name in CHAR_LM_TESTED:
        row = rows[name]
        assert finite(row["val_bits_per_byte"] + row["train_bits_per_byte"])
        assert row["train_bits_per_byte"][-1] < row["train_bits_per_byte"][0]
        assert row["steps"] == [4, 8]
    key_dim = TINY_LM["width"] // TINY_LM["num_heads"]
    map_parameters = TINY_LM["num_blocks"] * 2 * TINY_LM["num_heads"] * (key_dim + 1) * 5
    # The converted exact model, without and with a window: only the maps trained, for
    # `convert_steps` steps.
    for name, window in ((char_lm.CONVERTED, None), (windowed, 2)):
        converted = rows[name]
        assert converted["local_window"] == window
        assert converted["transfer_steps"] == 3 and len(converted["transfer_loss"]) == 1
        assert converted["trained_parameters"] == map_parameters
        assert converted["steps"] == [8 + 3]
        assert converted["exact_validation_bits_per_byte"] == pytest.approx(
            rows["exact"]["validation_bits_per_byte"], rel=1e-5
        )
        assert finite([converted["validation_bits_per_byte"], converted["relative_to_exact"]])
    assert (
        rows[windowed]["validation_bits_per_byte"]
        != rows[char_lm.CONVERTED]["validation_bits_per_byte"]
    )
    for name in ("results.md", "results.csv", "results.json", "loss_curves.png"):
        assert os.path.getsize(tmp_path / name) > 0
    with open(tmp_path / "results.json") as f:
        assert len(json.load(f)["results"]) == len(CHAR_LM_TESTED) + 2
    table = (tmp_path / "results.md").read_text()
    assert table.count("attention-transfer steps") == 2
    assert f"| `{windowed}` | {char_lm.description(windowed)} |" in table
    assert "`local_window=2`" in char_lm.description(windowed)
    for name in CHAR_LM_TESTED:
        assert f"| `{name}` | {char_lm.VARIANTS[name].description} |" in table
    exact, default = (rows[n]["validation_bits_per_byte"] for n in ("exact", "favor_default"))
    assert f"| {default:.3f} | {100 * (default / exact - 1):+.1f} % | — |" in table
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # merge=True adds a variant's row to the table, keeps the others (the conversion too, as
    # `exact` is not retrained) and orders them as VARIANTS.
    merged = char_lm.main(
        variants=["favor_relu"],
        merge=True,
        convert_steps=3,  # a setting of the table, even if no conversion runs now
        output_dir=str(tmp_path),
        **TINY_TRAINING,
    )
    assert [row["variant"] for row in merged["results"]] == ["favor_relu"]
    with open(tmp_path / "results.json") as f:
        written = json.load(f)
    names = [row["variant"] for row in written["results"]]
    assert names == [
        "exact",
        char_lm.CONVERTED,
        windowed,
        "favor_relu",
        "favor_default",
        "favor_hyperbolic_decay_conv_rope",
    ]
    assert written["settings"]["variants"] == [n for n in names if not char_lm.is_converted(n)]
    assert written["results"][0] == json.loads(json.dumps(rows["exact"]))
    assert "| `favor_relu` |" in (tmp_path / "results.md").read_text()


def test_char_lm_exact_counterparts_have_the_same_extras():
    counterparts = {name: char_lm.exact_counterpart(name) for name in char_lm.VARIANTS}
    assert counterparts == {
        "exact": None,
        "favor_positive_redraw": "exact",
        "favor_positive_fixed": "exact",
        "favor_hyperbolic": "exact",
        "favor_relu": "exact",
        "favor_hedgehog": "exact",
        "favor_default": None,  # sine positions and conv 4: no exact variant has both
        "favor_default_noconv": "exact",
        "exact_rope": None,
        "exact_conv_rope": None,
        "exact_conv_nope": None,
        "favor_conv_rope": "exact_conv_rope",
        "favor_decay_conv_nope": "exact_conv_nope",
        "favor_decay_conv_nope_fixed": "exact_conv_nope",
        "favor_hyperbolic_decay_conv_nope_fixed": "exact_conv_nope",
        "favor_decay_conv_rope": "exact_conv_rope",
        "favor_hyperbolic_decay_conv_rope": "exact_conv_rope",
        "favor_decay256_conv_rope": "exact_conv_rope",
    }


def test_char_lm_merge_refuses_other_settings(tmp_path):
    settings = {"variants": ["exact"], "steps": 8}
    (tmp_path / "results.json").write_text(json.dumps({"settings": settings, "results": []}))
    with pytest.raises(ValueError, match=r"merge=True .*'steps': \(8, 9\)"):
        char_lm.load_previous(str(tmp_path), {"variants": ["favor_relu"], "steps": 9})
    assert char_lm.load_previous(str(tmp_path), {"variants": ["favor_relu"], "steps": 8}) == {}
    assert char_lm.load_previous(str(tmp_path / "missing"), settings) == {}


def test_char_lm_merge_rows_replaces_the_conversion_with_exact():
    old = {name: {"variant": name, "run": "old"} for name in ("favor_relu", "exact")}
    old[char_lm.CONVERTED] = {"variant": char_lm.CONVERTED, "run": "old"}
    rows = char_lm.merge_rows(old, [{"variant": "exact", "run": "new"}])
    assert rows == [{"variant": "exact", "run": "new"}, old["favor_relu"]]
    rows = char_lm.merge_rows(old, [{"variant": "exact_rope", "run": "new"}])
    assert [row["variant"] for row in rows] == [
        "exact",
        char_lm.CONVERTED,
        "favor_relu",
        "exact_rope",
    ]


@pytest.mark.parametrize("variants", [["exact", "nope"], []])
def test_char_lm_rejects_unknown_variants(tmp_path, variants):
    with pytest.raises(ValueError, match=r"`variants`.*Received: variants="):
        char_lm.main(variants=variants, output_dir=str(tmp_path))


def test_char_lm_rejects_a_merge_that_is_not_a_bool(tmp_path):
    with pytest.raises(ValueError, match="Received: merge='yes'"):
        char_lm.main(variants=["exact"], merge="yes", output_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# examples/long_classification.py


def evaluate_listops(tokens):
    """An independent ListOps evaluator (a stack machine) for the generator's labels."""
    stack = []
    for token in tokens:
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            operator, *values = stack.pop()
            value = {
                "[MIN": min,
                "[MAX": max,
                "[MED": lambda v: int(np.floor(np.median(v))),
                "[SM": lambda v: sum(v) % 10,
            }[operator](values)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            if not stack:
                return int(token)
            stack[-1].append(int(token))
    raise AssertionError("unbalanced expression")


def test_listops_generator():
    expressions, labels = long_classification.generate_listops(
        40, min_length=20, max_length=120, seed=3
    )
    again, again_labels = long_classification.generate_listops(
        40, min_length=20, max_length=120, seed=3
    )
    assert expressions == again and np.array_equal(labels, again_labels)
    assert len({" ".join(e) for e in expressions}) == 40
    for tokens, label in zip(expressions, labels):
        assert 20 < len(tokens) < 120
        assert evaluate_listops(tokens) == label
    assert evaluate_listops("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]".split()) == 5
    ids = long_classification.encode(expressions[:2], 130)
    assert ids.shape == (2, 130) and (ids[0, len(expressions[0]) :] == 0).all()


@pytest.mark.slow
def test_long_classification(tmp_path):
    result = long_classification.main(
        train_examples=48,
        test_examples=16,
        min_length=10,
        max_length=64,
        steps=12,
        epochs=2,
        batch_size=8,
        width=16,
        num_heads=2,
        num_blocks=1,
        intermediate_dim=32,
        num_random_features=16,
        learning_rate=3e-3,
        output_dir=str(tmp_path),
        verbose=0,
    )
    rows = {row["variant"]: row for row in result["results"]}
    assert list(rows) == ["favor", "exact"]
    for row in rows.values():
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert finite(row["loss"]) and row["loss"][-1] < row["loss"][0]
        assert row["inference_seconds_per_batch"] > 0
    assert rows["favor"]["parameters"] == rows["exact"]["parameters"]
    assert result["settings"]["padded_length"] == 63
    for name in ("results.md", "results.csv", "results.json"):
        assert os.path.getsize(tmp_path / name) > 0


# ------------------------------------------------------------------------------------------------
# examples/long_recall.py


def test_recall_task_layout():
    task = long_recall.Task(num_pairs=4, num_queries=3, num_keys=6, num_values=5, num_noise=7)
    assert task.vocabulary_size == 18 and task.chance == pytest.approx(1 / 5)
    inputs, targets = task.sample(np.random.default_rng(0), 20, gap=9)
    assert inputs.shape == (20, task.length(9)) == (20, 8 + 9 + 3) and targets.shape == (20, 3)
    for x, y in zip(inputs, targets):
        keys, values = x[0:8:2], x[1:8:2] - 6
        assert (
            len(set(keys)) == 4 and (keys < 6).all() and (values >= 0).all() and (values < 5).all()
        )
        assert ((x[8:17] >= 11) & (x[8:17] < 18)).all()  # the gap is noise only
        queries = x[17:]
        assert len(set(queries)) == 3 and set(queries) <= set(keys)
        answers = {int(k): int(v) for k, v in zip(keys, values)}
        assert [answers[int(q)] for q in queries] == list(y)
        # The answer to every query lies at least gap + 1 positions back.
        for offset, query in enumerate(queries):
            stored = 2 * list(keys).index(query) + 1
            assert 17 + offset - stored >= task.min_distance(9) == 10
    again, _ = task.sample(np.random.default_rng(0), 20, gap=9)
    np.testing.assert_array_equal(inputs, again)
    with pytest.raises(ValueError, match="num_queries"):
        long_recall.Task(num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="num_pairs"):
        long_recall.Task(num_pairs=9, num_keys=8)


def test_recall_batches_cycle_the_gaps_with_new_draws_per_epoch_and_stream():
    task = long_recall.Task(num_pairs=2, num_queries=2, num_keys=4, num_values=4, num_noise=4)
    batches = long_recall.Batches(task, 3, 2, gaps=(8, 16), seed=1)
    assert [batches[i][0].shape[1] for i in range(3)] == [task.length(g) for g in (8, 16, 8)]
    first = batches[0][0]
    np.testing.assert_array_equal(batches[0][0], first)  # the same batch on a second read
    batches.on_epoch_end()
    assert not np.array_equal(batches[0][0], first)
    other = long_recall.Batches(task, 3, 2, gaps=(8, 16), seed=1, stream=1)
    assert not np.array_equal(other[0][0], first)


@pytest.mark.parametrize("variant", long_recall.VARIANTS)
def test_recall_model_reads_the_query_positions(variant):
    task = long_recall.Task(num_pairs=4, num_queries=3, num_keys=6, num_values=5, num_noise=7)
    model = long_recall.build_model(
        variant,
        task,
        width=8,
        num_heads=2,
        num_blocks=1,
        intermediate_dim=8,
        num_random_features=8,
    )
    inputs, _ = task.sample(np.random.default_rng(0), 2, gap=20)
    logits = np.asarray(model(inputs))
    assert logits.shape == (2, 3, 5)
    # Causal: changing the last query changes only its own answer.
    changed = inputs.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 6
    other = np.asarray(model(changed))
    np.testing.assert_allclose(other[:, :2], logits[:, :2], rtol=1e-5, atol=1e-6)
    assert np.abs(other[:, 2] - logits[:, 2]).max() > 0


def test_long_recall(tmp_path):
    result = long_recall.main(
        num_pairs=4,
        num_queries=4,
        num_keys=8,
        num_values=8,
        num_noise=8,
        train_gaps=(0, 4),
        first_epoch_gaps=(0, 2),
        eval_gaps=(4, 40),
        exact_max_gap=4,
        steps=6,
        epochs=2,
        batch_size=8,
        width=16,
        num_heads=2,
        num_blocks=1,
        intermediate_dim=16,
        num_random_features=8,
        causal_chunk_size=16,
        learning_rate=1e-2,
        redraw_every=2,
        eval_sequences=8,
        output_dir=str(tmp_path),
        verbose=0,
    )
    rows = {row["variant"]: row for row in result["results"]}
    assert list(rows) == ["favor", "exact"]
    for row in rows.values():
        # Two epochs, the first on `first_epoch_gaps`, in two `fit` calls: one history.
        assert 0.0 <= row["accuracy_gap_4"] <= 1.0 and len(row["validation_accuracy"]) == 2
        assert finite(row["loss"]) and row["loss"][-1] < row["loss"][0]
    assert 0.0 <= rows["favor"]["accuracy_gap_40"] <= 1.0
    assert rows["favor"]["inference_seconds_gap_40"] > 0
    # Exact attention stops at exact_max_gap: not run beyond it.
    assert rows["exact"]["accuracy_gap_40"] is None
    assert rows["exact"]["inference_seconds_gap_40"] is None
    assert rows["favor"]["parameters"] == rows["exact"]["parameters"]
    assert result["settings"]["chance"] == pytest.approx(1 / 8)
    # 6 steps, a redraw every 2 (before steps 2 and 4), in the FAVOR model's one attention layer.
    assert rows["favor"]["redraw_counts"] == [2] and rows["exact"]["redraw_counts"] == []
    assert result["settings"]["lengths"] == [16, 52]
    assert result["settings"]["first_epoch_gaps"] == [0, 2]
    for name in ("results.md", "results.csv", "results.json"):
        assert os.path.getsize(tmp_path / name) > 0
    assert "| exact | " in (tmp_path / "results.md").read_text()


def test_long_recall_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="variants"):
        long_recall.main(variants=["favor", "nope"], output_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# examples/export_tf_serving.py and examples/export_tflite.py

TINY_EXPORT = dict(
    steps=4,
    batch_size=4,
    sequence_length=32,
    max_train_bytes=50_000,
    num_tokens=4,
    verbose=0,
    **TINY_LM,
)


@tf_only
def test_export_tf_serving(tmp_path):
    from examples import export_tf_serving

    output = str(tmp_path / "favor_lm")
    result = export_tf_serving.main(
        output=output, check_length=64, saved_model_cli=False, **TINY_EXPORT
    )
    assert result["saved_model_dir"] == os.path.join(output, "1")
    assert result["signatures"] == ["decode_step", "initial_state", "serve", "serving_default"]
    assert set(result["differences"]) == {
        "c_api_serving_default",
        "rest_instances",
        "rest_inputs",
        "c_api_decode_step",
        "rest_decode_step",
    }
    assert max(result["differences"].values()) < 1e-4
    predictions = np.asarray(result["row_response"]["predictions"])
    assert predictions.shape == (1, len(export_tf_serving.DEFAULT_PROMPT), data.VOCABULARY_SIZE)
    assert len(result["generated"]) >= 1
    # One (S, z) pair of the single block: S (1, N, M, D), z (1, N, M).
    assert sorted(result["state_shapes"].values()) == [[1, 2, 16], [1, 2, 16, 8]]


@tf_only
def test_export_tflite(tmp_path):
    from examples import export_tflite

    output = str(tmp_path / "favor_lm.tflite")
    result = export_tflite.main(output=output, lengths=(16, 4096), **TINY_EXPORT)
    assert os.path.getsize(output) > 0
    assert result["signatures"] == ["decode_step", "initial_state", "serving_default"]
    assert [c["length"] for c in result["checks"]] == [16, 4096]
    for check in result["checks"]:
        assert check["max_abs_difference"] < 1e-4
        assert check["tflite_bits_per_byte"] == pytest.approx(check["keras_bits_per_byte"], 1e-4)
    assert result["decode_difference"] < 1e-4
