"""gRPC `PredictRequest`s, built with `tensorflow-serving-api` as a TF Serving client builds them.

No `tensorflow_model_server` can run here (it is not on PyPI or Debian, and no container registry
is reachable), so the server side is a stand-in: `_PredictionService`, a
`PredictionServiceServicer` that answers ``Predict`` the way TF Serving's predict handler does:
it looks the signature up in the SavedModel's SignatureDefs, checks that every input alias and
dtype matches (TF Serving rejects an int64 tensor for an int32 input), converts each
`TensorProto` with `tf.make_ndarray`, runs the signature through the TF C API SavedModel loader
that TF Serving is built on (`SavedModelSession`), honours ``output_filter``, and answers a
`PredictResponse` whose ``model_spec`` names the version and whose outputs come from
`tf.make_tensor_proto`. It is served on a real gRPC channel on the loopback interface, so the
client code below (`PredictionServiceStub(channel).Predict(request)`) is what a client of a real
server runs; only the address differs.

The model is the committed golden language model (saved_models/golden/favor_lm/1): its stored
inputs and outputs are the expectations, for ``serving_default`` and for streaming decoding with
``initial_state`` and ``decode_step`` (the state travels as TensorProtos, copied from each
response into the next request without leaving the proto form).
"""

import os
from concurrent import futures

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving")
grpc = pytest.importorskip("grpc")

import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_favor.export.saved_model import SERVING_DEFAULT  # noqa: E402
from keras_favor.export.testing import SavedModelSession  # noqa: E402
from tests.export import golden_artifacts as golden  # noqa: E402
from tests.testing import assert_close_to_scale  # noqa: E402

ATOL = 1e-5
MODEL_NAME = golden.LM


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A one-model stand-in for TF Serving's ``PredictionService.Predict``."""

    def __init__(self, model_name, version_dir):
        self.model_name = model_name
        self.version = int(os.path.basename(os.path.normpath(version_dir)))
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        (meta_graph,) = proto.meta_graphs
        self.signatures = dict(meta_graph.signature_def)
        self.session = SavedModelSession(version_dir)

    def predict(self, request):
        """PredictRequest -> PredictResponse, or (grpc.StatusCode, message) on a bad request."""
        spec = request.model_spec
        if spec.name != self.model_name or (
            spec.HasField("version") and spec.version.value != self.version
        ):
            return grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {spec.name}"
        signature_name = spec.signature_name or SERVING_DEFAULT
        signature = self.signatures.get(signature_name)
        if signature is None:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        if set(request.inputs) != set(signature.inputs):
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input tensor aliases {sorted(request.inputs)} do not match the signature's "
                f"inputs {sorted(signature.inputs)}",
            )
        feed = {}
        for alias, tensor in request.inputs.items():
            want = signature.inputs[alias].dtype
            if tensor.dtype != want:
                return (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg {alias!r} to be {types_pb2.DataType.Name(want)} but "
                    f"{types_pb2.DataType.Name(tensor.dtype)} is provided",
                )
            feed[alias] = tf.make_ndarray(tensor)
        unknown = set(request.output_filter) - set(signature.outputs)
        if unknown:
            return grpc.StatusCode.INVALID_ARGUMENT, f"output tensor aliases not found: {unknown}"
        outputs = self.session.run(feed, signature_name)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for alias in request.output_filter or sorted(outputs):
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias]))
        return response

    def Predict(self, request, context):  # noqa: N802 (the gRPC method name)
        result = self.predict(request)
        if isinstance(result, tuple):
            context.abort(*result)
        return result


@pytest.fixture(scope="module")
def service():
    path = golden.artifact_paths(MODEL_NAME)["saved_model"]
    service = _PredictionService(MODEL_NAME, path)
    yield service
    service.session.close()


@pytest.fixture(scope="module")
def stub(service):
    """A `PredictionServiceStub` on a gRPC channel to the stand-in server (loopback)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        pytest.skip("cannot bind a loopback port for the gRPC server")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


@pytest.fixture(scope="module")
def expected():
    with np.load(golden.artifact_paths(MODEL_NAME)["expected"]) as data:
        return dict(data)


def _request(signature_name, inputs, output_filter=()):
    """The client side: a PredictRequest as one is built for TF Serving."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = signature_name
    for alias, value in inputs.items():
        if isinstance(value, tensor_pb2.TensorProto):
            request.inputs[alias].CopyFrom(value)  # e.g. a state tensor from the last response
        else:
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def test_request_wire_format():
    ids = np.array([[5, 7, 9]], dtype=np.int32)
    request = _request("serving_default", {"token_ids": ids})
    # What travels: serialized bytes, parsed back by the server.
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert parsed.model_spec.name == MODEL_NAME
    assert parsed.model_spec.signature_name == "serving_default"
    tensor = parsed.inputs["token_ids"]
    assert tensor.dtype == types_pb2.DT_INT32
    assert [d.size for d in tensor.tensor_shape.dim] == [1, 3]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), ids)


def test_serving_default(stub, expected):
    ids = expected["token_ids"]
    response = stub.Predict(_request("serving_default", {"token_ids": ids}), timeout=60)
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == golden.VERSION
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs) == ["logits"]
    logits = response.outputs["logits"]
    assert logits.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in logits.tensor_shape.dim] == list(ids.shape) + [golden.VOCAB]
    np.testing.assert_allclose(tf.make_ndarray(logits), expected["logits"], atol=ATOL, rtol=0)


def test_decode_step_from_stored_state(stub, expected):
    count = sum(key.startswith("decode_in_state_") for key in expected)
    inputs = {f"state_{i}": expected[f"decode_in_state_{i}"] for i in range(count)}
    inputs.update(token_ids=expected["decode_token_ids"], position=expected["decode_position"])
    response = stub.Predict(_request("decode_step", inputs), timeout=60)
    assert sorted(response.outputs) == sorted(["logits"] + [f"state_{i}" for i in range(count)])
    got = tf.make_ndarray(response.outputs["logits"])
    np.testing.assert_allclose(got, expected["decode_logits"], atol=ATOL, rtol=0)
    for i in range(count):
        got = tf.make_ndarray(response.outputs[f"state_{i}"])
        assert_close_to_scale(got, expected[f"decode_out_state_{i}"], ATOL)


def test_streaming_decode_reproduces_forward(stub, expected):
    """initial_state, then one decode_step per token, the state passed on as TensorProtos."""
    ids = expected["token_ids"]
    batch, length = ids.shape
    response = stub.Predict(_request("initial_state", {"batch_size": np.int32(batch)}), timeout=60)
    state = dict(response.outputs)  # alias -> TensorProto
    assert sorted(state) == [f"state_{i}" for i in range(4)]
    logits = []
    for t in range(length):
        inputs = dict(state, token_ids=ids[:, t], position=np.full((batch,), t, np.int32))
        response = stub.Predict(_request("decode_step", inputs), timeout=60)
        logits.append(tf.make_ndarray(response.outputs["logits"]))
        state = {alias: response.outputs[alias] for alias in state}
    np.testing.assert_allclose(np.stack(logits, 1), expected["logits"], atol=ATOL, rtol=0)


def test_output_filter(stub, expected):
    inputs = {"batch_size": np.int32(1)}
    response = stub.Predict(_request("initial_state", inputs, ["state_1"]), timeout=60)
    assert list(response.outputs) == ["state_1"]
    z = tf.make_ndarray(response.outputs["state_1"])  # z of block 0: (B, N, M), zeros
    np.testing.assert_array_equal(z, np.zeros((1,) + expected["decode_in_state_1"].shape[1:]))


@pytest.mark.parametrize(
    "change, code, match",
    [
        ("int64_ids", grpc.StatusCode.INVALID_ARGUMENT, "DT_INT32 but DT_INT64"),
        ("missing_input", grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        ("signature", grpc.StatusCode.FAILED_PRECONDITION, "predict"),
        ("model", grpc.StatusCode.NOT_FOUND, "other_model"),
    ],
)
def test_bad_requests_are_refused(stub, change, code, match):
    ids = np.array([[1, 2, 3]], dtype=np.int32)
    if change == "int64_ids":  # numpy's default integer: a real server refuses it too
        request = _request("serving_default", {"token_ids": ids.astype(np.int64)})
    elif change == "missing_input":
        request = _request("serving_default", {"tokens": ids})
    else:
        request = _request("serving_default", {"token_ids": ids})
        if change == "signature":
            request.model_spec.signature_name = "predict"
        else:
            request.model_spec.name = "other_model"
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=60)
    assert error.value.code() == code
    assert match in error.value.details()
