"""`keras_favor.export.testing`: the TF C API SavedModel loader (as TF Serving), `saved_model_cli
run`, and TF Serving's REST predict JSON formats, all matching Keras."""

import json

import keras
import numpy as np
import pytest

from keras_favor import export
from keras_favor.export.testing import SavedModelSession, rest_predict, saved_model_cli_run
from keras_favor.layers import FavorAttention
from tests.export.conftest import WIDTH, random_ids, random_tokens, stream

ATOL = 1e-5


@pytest.fixture(scope="module")
def lm_session(lm_export):
    with SavedModelSession(lm_export) as session:
        yield session


def test_c_api_serving_default_matches_keras(lm, lm_session):
    assert lm_session.signature_names == [
        "decode_step",
        "initial_state",
        "serve",
        "serving_default",
    ]
    assert lm_session.signature() == (["token_ids"], ["logits"])
    for batch, length in [(1, 1), (2, 9), (3, 33)]:
        ids = random_ids(batch, length, seed=length)
        got = lm_session.run({"token_ids": ids})["logits"]
        assert got.shape == (batch, length, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, lm(ids), atol=ATOL, rtol=0)


def test_c_api_decode_step_reproduces_forward(lm, lm_session):
    ids = random_ids(3, 10, seed=8)
    got = stream(lambda name, inputs: lm_session.run(inputs, name), 3, ids)
    np.testing.assert_allclose(got, lm(ids), atol=ATOL, rtol=0)


def test_c_api_errors(lm_session, lm_export):
    with pytest.raises(ValueError, match="signature_name"):
        lm_session.run({"token_ids": random_ids(1, 2)}, "predict")
    with pytest.raises(ValueError, match="inputs"):
        lm_session.run({"tokens": random_ids(1, 2)})
    with pytest.raises(RuntimeError, match="Loading SavedModel"):
        SavedModelSession(lm_export + "-missing")
    session = SavedModelSession(lm_export)
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.run({"token_ids": random_ids(1, 2)})


@pytest.mark.slow
def test_saved_model_cli_run(attention_exports):
    model, path = attention_exports[True]
    x = random_tokens(2, 11, seed=2)
    got = saved_model_cli_run(path, {"tokens": x})
    assert sorted(got) == ["logits"]
    np.testing.assert_allclose(got["logits"], model(x), atol=ATOL, rtol=0)


@pytest.fixture(scope="module", params=["session", "directory"])
def server(request, attention_exports):
    """(model, what rest_predict serves from) for the non-causal attention model."""
    model, path = attention_exports[False]
    if request.param == "session":
        with SavedModelSession(path) as session:
            yield model, session
    else:
        yield model, path


def _post(served, body):
    """Serialises like an HTTP client and server would: JSON text in, JSON text out."""
    return json.loads(json.dumps(rest_predict(served, json.dumps(body))))


def test_rest_row_format(server):
    model, served = server
    x = random_tokens(2, 5, seed=1)
    want = keras.ops.convert_to_numpy(model(x))
    response = _post(served, {"instances": x.tolist()})
    assert list(response) == ["predictions"]
    assert len(response["predictions"]) == 2  # one entry per instance
    np.testing.assert_allclose(np.array(response["predictions"]), want, atol=ATOL, rtol=0)
    # A single named input may also be given as a one-key object per instance.
    response = _post(served, {"instances": [{"tokens": row} for row in x.tolist()]})
    np.testing.assert_allclose(np.array(response["predictions"]), want, atol=ATOL, rtol=0)


def test_rest_columnar_format(server):
    model, served = server
    x = random_tokens(2, 5, seed=1)
    want = keras.ops.convert_to_numpy(model(x))
    for body in ({"inputs": x.tolist()}, {"inputs": {"tokens": x.tolist()}}):
        response = _post(served, dict(body, signature_name="serving_default"))
        assert list(response) == ["outputs"]
        np.testing.assert_allclose(np.array(response["outputs"]), want, atol=ATOL, rtol=0)


def test_rest_several_inputs_and_outputs(tmp_path):
    queries = keras.Input((None, WIDTH), name="queries")
    context = keras.Input((None, WIDTH), name="context")
    attended = FavorAttention(2, 8, num_random_features=16, seed=2)(queries, context)
    pooled = keras.layers.GlobalAveragePooling1D()(attended)
    model = keras.Model(
        {"queries": queries, "context": context}, {"attended": attended, "pooled": pooled}
    )
    path = export.export_saved_model(model, tmp_path)
    q, c = random_tokens(2, 3, seed=1), random_tokens(2, 6, seed=2)
    want = {
        k: keras.ops.convert_to_numpy(v) for k, v in model({"queries": q, "context": c}).items()
    }

    rows = _post(
        path,
        {"instances": [{"queries": q[i].tolist(), "context": c[i].tolist()} for i in range(2)]},
    )
    assert list(rows) == ["predictions"] and len(rows["predictions"]) == 2
    for i, prediction in enumerate(rows["predictions"]):
        assert sorted(prediction) == ["attended", "pooled"]
        for name in prediction:
            np.testing.assert_allclose(prediction[name], want[name][i], atol=ATOL, rtol=0)

    columns = _post(path, {"inputs": {"queries": q.tolist(), "context": c.tolist()}})
    assert list(columns) == ["outputs"] and sorted(columns["outputs"]) == ["attended", "pooled"]
    for name, value in columns["outputs"].items():
        np.testing.assert_allclose(value, want[name], atol=ATOL, rtol=0)


def test_rest_streaming_decode(lm, lm_session):
    """A REST client streams tokens: initial_state, then decode_step with the state fed back."""
    ids = random_ids(2, 6, seed=9)
    response = _post(lm_session, {"signature_name": "initial_state", "inputs": {"batch_size": 2}})
    state = response["outputs"]
    assert sorted(state) == [f"state_{i}" for i in range(6)]  # (S, z, conv inputs) per block
    logits = []
    for t in range(ids.shape[1]):
        if t % 2:  # columnar
            body = {"inputs": dict(state, token_ids=ids[:, t].tolist(), position=[t, t])}
            outputs = _post(lm_session, dict(body, signature_name="decode_step"))["outputs"]
        else:  # row format: one object per sequence, state included
            instances = [
                dict({k: v[i] for k, v in state.items()}, token_ids=int(ids[i, t]), position=t)
                for i in range(2)
            ]
            rows = _post(lm_session, {"signature_name": "decode_step", "instances": instances})
            predictions = rows["predictions"]
            outputs = {k: [p[k] for p in predictions] for k in predictions[0]}
        logits.append(outputs.pop("logits"))
        state = outputs
    np.testing.assert_allclose(np.stack(logits, 1), lm(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "body, match",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({}, "exactly one of"),
        ({"instances": [[[0.0] * WIDTH]], "inputs": [[[0.0] * WIDTH]]}, "exactly one of"),
        ({"instances": [], "signature_name": "serving_default"}, "non-empty"),
        ({"instances": [[[0.0] * WIDTH]], "extra": 1}, "Unknown request keys"),
        ({"instances": [[[0.0] * WIDTH], [[0.0] * WIDTH] * 2]}, "rectangular"),
        ({"instances": [{"other": [[0.0] * WIDTH]}]}, "keys"),
        ({"inputs": {"other": [[[0.0] * WIDTH]]}}, "keys"),
        ({"inputs": [[[0.0] * WIDTH]], "signature_name": "predict"}, "signature_name"),
    ],
)
def test_rest_bad_requests(server, body, match):
    _, served = server
    with pytest.raises(ValueError, match=match):
        rest_predict(served, body if isinstance(body, str) else json.dumps(body))


def test_rest_predict_serves_sessions_and_directories_only(attention_exports):
    import tensorflow as tf

    _, path = attention_exports[False]
    loaded = tf.saved_model.load(path)
    with pytest.raises(ValueError, match="model"):
        rest_predict(loaded, {"inputs": [[[0.0] * WIDTH]]})
