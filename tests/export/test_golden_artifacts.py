"""The committed golden artifacts (saved_models/golden/) still run, and give the stored outputs.

Each artifact is loaded with the current code the way users load it: the `.keras` file with
`keras.saving.load_model`, the SavedModel with `tf.saved_model.load` and with the TF C API loader
that TF Serving uses (`SavedModelSession`), the `.tflite` with LiteRT. Every one must reproduce the
stored outputs (``expected.npz``, written from the Keras model when the artifacts were made), so a
change that would silently alter or break models users already deployed fails here. The stored
`.keras` file re-exported with the current code must match too, with the same serving interface
(plus ``serve``, the same function as ``serving_default``).

Tolerance, relative to each array's largest magnitude (at least 1): ≤ 1e-5, for every loader. The
`.keras` file reruns the same float32 Keras math (bit-exact on the machine that wrote them; one
float32 ulp apart with `TF_ENABLE_ONEDNN_OPTS=0`, where the decode state's entries of magnitude 55
differ by 3.8e-6); SavedModels and `.tflite` run the graph traced when the artifacts were made, in
other kernels (oneDNN, XNNPACK). A change in what the models compute moves outputs by far more.

If a change is *meant* to alter these models' outputs, regenerate the artifacts
(``python -m tests.export.golden_artifacts``) and say so in the commit message.
"""

import os

import keras
import numpy as np
import pytest

from keras_favor import export
from keras_favor.export.saved_model import saved_model_signature_names
from keras_favor.export.testing import SavedModelSession
from keras_favor.layers import decode_step
from tests.export import golden_artifacts as golden
from tests.export.conftest import stream
from tests.testing import assert_close_to_scale

ATOL = 1e-5
MAX_BYTES = 1_000_000


def _expected(name):
    with np.load(golden.artifact_paths(name)["expected"]) as data:
        return dict(data)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _state_arrays(expected, prefix):
    """The stored state tensors named state_0, state_1, ... (as in the signatures)."""
    count = sum(key.startswith(prefix) for key in expected)
    return {f"state_{i}": expected[f"{prefix}{i}"] for i in range(count)}


def _check_outputs(run, name):
    """Checks `run(signature, inputs) -> dict` on the stored inputs against the stored outputs."""
    expected = _expected(name)
    if name == golden.ATTENTION:
        inputs = {key: expected[key] for key in ("tokens", "padding_mask")}
        got = run("serving_default", inputs)
        assert sorted(got) == ["outputs"]
        assert_close_to_scale(got["outputs"], expected["outputs"], ATOL)
        return
    ids = expected["token_ids"]
    got = run("serving_default", {"token_ids": ids})
    assert sorted(got) == ["logits"]
    assert_close_to_scale(got["logits"], expected["logits"], ATOL)
    # One decode step from the stored (filled) state.
    state_in = _state_arrays(expected, "decode_in_state_")
    inputs = dict(
        state_in,
        token_ids=expected["decode_token_ids"],
        position=expected["decode_position"],
    )
    got = run("decode_step", inputs)
    assert sorted(got) == sorted(["logits", *state_in])
    assert_close_to_scale(got.pop("logits"), expected["decode_logits"], ATOL)
    for key, value in _state_arrays(expected, "decode_out_state_").items():
        assert_close_to_scale(got[key], value, ATOL)
    # Streaming every position from `initial_state` reproduces the full forward.
    streamed = stream(run, ids.shape[0], ids)
    assert_close_to_scale(streamed, expected["logits"], ATOL)


def _saved_model_runner(path):
    import tensorflow as tf

    signatures = tf.saved_model.load(path).signatures

    def run(signature_name, inputs):
        outputs = signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    return run


def _signature_interface(path):
    """signature -> (inputs, outputs), each name -> (dtype enum, shape), from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())

    def describe(tensors):
        return {
            name: (info.dtype, [d.size for d in info.tensor_shape.dim])
            for name, info in tensors.items()
        }

    return {
        key: (describe(sig.inputs), describe(sig.outputs))
        for key, sig in proto.meta_graphs[0].signature_def.items()
        if not key.startswith("__")
    }


def test_artifacts_present_small_and_not_ignored():
    for name in golden.NAMES:
        paths = golden.artifact_paths(name)
        for kind in ("keras", "tflite", "expected"):
            assert os.path.isfile(paths[kind]), paths[kind]
        assert os.path.isfile(os.path.join(paths["saved_model"], "saved_model.pb"))
        assert os.path.isdir(os.path.join(paths["saved_model"], "variables"))
        sizes = golden.artifact_sizes(name)
        assert all(0 < size < MAX_BYTES for size in sizes.values()), sizes
    lm_signatures = ["decode_step", "initial_state", "serving_default"]
    lm_dir = golden.artifact_paths(golden.LM)["saved_model"]
    assert saved_model_signature_names(lm_dir) == lm_signatures
    attention_dir = golden.artifact_paths(golden.ATTENTION)["saved_model"]
    assert saved_model_signature_names(attention_dir) == ["serving_default"]


def test_expected_arrays_are_consistent():
    """The stored arrays themselves: shapes, and the decode step sits on the full forward."""
    lm = _expected(golden.LM)
    batch, length = lm["token_ids"].shape
    assert lm["logits"].shape == (batch, length, golden.VOCAB)
    position = golden.DECODE_PREFIX
    np.testing.assert_array_equal(lm["decode_position"], np.full((batch,), position))
    np.testing.assert_array_equal(lm["decode_token_ids"], lm["token_ids"][:, position])
    np.testing.assert_allclose(lm["decode_logits"], lm["logits"][:, position], atol=ATOL)
    assert len(_state_arrays(lm, "decode_in_state_")) == 4  # (S, z) for each of 2 blocks
    attention = _expected(golden.ATTENTION)
    assert attention["outputs"].shape == attention["tokens"].shape[:2] + (golden.ATTENTION_OUTPUTS,)
    assert not attention["padding_mask"].all()  # the stored inputs do exercise padding


@pytest.fixture(scope="module")
def keras_models():
    return {
        name: keras.saving.load_model(golden.artifact_paths(name)["keras"]) for name in golden.NAMES
    }


def _keras_runner(model):
    def run(signature_name, inputs):
        if signature_name == "serving_default":
            if len(inputs) == 1:
                return {"logits": _np(model(next(iter(inputs.values()))))}
            return {"outputs": _np(model(inputs))}
        if signature_name == "initial_state":
            from keras_favor.layers import initial_decode_state

            flat = keras.tree.flatten(initial_decode_state(model, int(inputs["batch_size"])))
            return {f"state_{i}": _np(t) for i, t in enumerate(flat)}
        count = sum(key.startswith("state_") for key in inputs)
        flat = [inputs[f"state_{i}"] for i in range(count)]
        state = [(flat[i], flat[i + 1]) for i in range(0, count, 2)]
        logits, new_state = decode_step(model, inputs["token_ids"], inputs["position"], state)
        flat = keras.tree.flatten(new_state)
        return {"logits": _np(logits), **{f"state_{i}": _np(t) for i, t in enumerate(flat)}}

    return run


@pytest.mark.parametrize("name", golden.NAMES)
def test_keras_file(keras_models, name):
    _check_outputs(_keras_runner(keras_models[name]), name)


@pytest.mark.parametrize("name", golden.NAMES)
def test_saved_model_tf_load(name):
    _check_outputs(_saved_model_runner(golden.artifact_paths(name)["saved_model"]), name)


@pytest.mark.parametrize("name", golden.NAMES)
def test_saved_model_c_api(name):
    with SavedModelSession(golden.artifact_paths(name)["saved_model"]) as session:
        _check_outputs(lambda signature, inputs: session.run(inputs, signature), name)


@pytest.mark.parametrize("name", golden.NAMES)
def test_tflite(name):
    pytest.importorskip("ai_edge_litert")
    runner = export.TFLiteRunner(golden.artifact_paths(name)["tflite"])
    saved_model = golden.artifact_paths(name)["saved_model"]
    assert runner.signature_names == saved_model_signature_names(saved_model)
    _check_outputs(lambda signature, inputs: runner.run(inputs, signature), name)


@pytest.mark.parametrize("name", golden.NAMES)
def test_reexport_with_current_code(keras_models, name, tmp_path):
    """The stored `.keras` file, exported again today: same outputs and the same interface."""
    model = keras_models[name]
    path = export.export_saved_model(model, tmp_path / name, golden.VERSION)
    stored = golden.artifact_paths(name)["saved_model"]
    interface = _signature_interface(path)
    # `serve` (the same function as `serving_default`) came after these artifacts were written.
    assert interface.pop("serve") == interface["serving_default"]
    assert interface == _signature_interface(stored)
    _check_outputs(_saved_model_runner(path), name)
    if name == golden.LM:  # the decoder's TFLite conversion is the one with most to break
        pytest.importorskip("ai_edge_litert")
        runner = export.TFLiteRunner(export.export_tflite(path, tmp_path / f"{name}.tflite"))
        _check_outputs(lambda signature, inputs: runner.run(inputs, signature), name)
