"""Export a FAVOR language model for TF Serving, and check it the way TF Serving runs it.

Run from the repository root:

    python examples/export_tf_serving.py                                  # trains a tiny model
    python examples/export_tf_serving.py --keras-model saved_models/quickstart.keras

1. Gets a byte-level FAVOR language model: loads a `.keras` file (for example the one
   `examples/quickstart.py` saves) or trains a tiny one for a few seconds.
2. Exports it with `keras_favor.export.export_saved_model` into the TF Serving layout
   `saved_models/favor_lm/1/`, with the signatures ``serving_default`` (token ids of any
   batch size and length -> logits; also under ``serve``, as `keras.Model.export` names it),
   ``initial_state`` and ``decode_step`` (streaming decoding: the state goes in and comes out, a
   constant cost per token).
3. Loads it with TensorFlow's C API SavedModel loader (`keras_favor.export.testing`'s
   `SavedModelSession`: the C++ loader TF Serving is built on) and checks ``serving_default``
   against Keras; answers TF Serving REST requests (`rest_predict`, from the same testing module:
   the row format ``{"instances": ...}`` and the columnar format
   ``{"inputs": ...}``, exactly as the server shapes them); streams a continuation with
   ``initial_state`` / ``decode_step`` and checks every step against the Keras forward pass;
   optionally runs ``saved_model_cli run`` too.
4. Prints how to serve it: the `tensorflow_model_server` command line and its docker form, a
   `curl` REST request with the response, and a gRPC `PredictRequest`
   (`tensorflow-serving-api`).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_favor  # noqa: E402, F401 (registers the layers for loading .keras files)
from examples import data, quickstart  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "saved_models", "favor_lm")
DEFAULT_PROMPT = "def "


def load_or_train_model(
    keras_model=None,
    steps=150,
    batch_size=16,
    sequence_length=128,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=256,
    num_random_features=32,
    max_train_bytes=2_000_000,
    seed=0,
    verbose=1,
):
    """A `.keras` language model loaded from `keras_model`, or a tiny one trained here."""
    if keras_model:
        model = keras.saving.load_model(keras_model, compile=False)
        print(f"Loaded {keras_model}: {data.trainable_parameters(model):,} parameters")
        return model
    keras.utils.set_random_seed(seed)
    corpus = data.load_corpus(max_train_bytes, max_validation_bytes=max_train_bytes // 10)
    model = quickstart.build_model(
        width=width,
        num_heads=num_heads,
        num_blocks=num_blocks,
        intermediate_dim=intermediate_dim,
        num_random_features=num_random_features,
        seed=seed,
    )
    print(
        f"Training a tiny model ({data.trainable_parameters(model):,} parameters, {steps} steps) "
        f"on {corpus}"
    )
    history, _ = quickstart.train(
        model,
        corpus,
        steps,
        batch_size,
        sequence_length,
        epochs=1,
        redraw_every=max(1, (2 * steps) // 5),  # the last redraw well before the end
        validation_windows=16,
        seed=seed,
        verbose=verbose,
    )
    print(f"Validation: {data.bits_per_byte(history['val_loss'][-1]):.3f} bits per byte")
    return model


def stream(run, prompt_ids, num_tokens, temperature=0.0, seed=0):
    """Generates with an exported model's ``initial_state`` / ``decode_step`` signatures.

    Args:
        run: `run(inputs, signature_name) -> outputs` (a `SavedModelSession.run` or a
            `TFLiteRunner.run`).
        prompt_ids: the prompt's byte tokens (at least one).
        num_tokens: bytes to generate after the prompt.
        temperature: 0 picks the most likely byte; otherwise sample with this temperature.
        seed: the sampling seed.

    Returns:
        (generated ids (num_tokens,), logits of every step (len(prompt) + num_tokens - 1, V)).
    """
    rng = np.random.default_rng(seed)
    state = run({"batch_size": np.int32(1)}, "initial_state")  # {"state_0": ..., ...}
    token = int(prompt_ids[0])
    generated, all_logits = [], []
    for position in range(len(prompt_ids) + num_tokens - 1):
        inputs = dict(
            state,
            token_ids=np.array([token], dtype=np.int32),
            position=np.array([position], dtype=np.int32),
        )
        outputs = run(inputs, "decode_step")
        logits = outputs.pop("logits")[0].astype("float64")
        state = outputs  # the new state, under the same names: feed it back
        all_logits.append(logits)
        if position + 1 < len(prompt_ids):
            token = int(prompt_ids[position + 1])
        elif temperature <= 0:
            token = int(np.argmax(logits))
            generated.append(token)
        else:
            probs = np.exp((logits - logits.max()) / temperature)
            token = int(rng.choice(probs.size, p=probs / probs.sum()))
            generated.append(token)
    return np.asarray(generated, dtype="int32"), np.stack(all_logits)


def keras_logits(model, ids):
    """The Keras model's logits for (B, L) ids, as numpy."""
    return keras.ops.convert_to_numpy(model.predict(np.asarray(ids, "int32"), verbose=0))


def _shorten(value, keep=3):
    """Lists of numbers cut to `keep` entries (followed by "...") for printing."""
    if isinstance(value, list):
        if value and not isinstance(value[0], list):
            rounded = [round(v, 4) if isinstance(v, float) else v for v in value[:keep]]
            return rounded + (["..."] if len(value) > keep else [])
        return [_shorten(v, keep) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v, keep) for k, v in value.items()}
    return value


def _display_path(path):
    """`$PWD/...` for a path under the working directory (for copy-pasteable commands)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else f"$PWD/{relative}"


def serving_instructions(base_path, model_name, request_body, response_body):
    """The commands that serve `base_path` and query it, with a real request and response."""
    shown = _display_path(base_path)
    return "\n".join(
        [
            "Serve it with TF Serving (REST on 8501, gRPC on 8500):",
            "",
            f"  tensorflow_model_server --port=8500 --rest_api_port=8501 \\\n"
            f"      --model_name={model_name} --model_base_path={shown}",
            "",
            "or with docker:",
            "",
            f"  docker run --rm -p 8500:8500 -p 8501:8501 \\\n"
            f"      --mount type=bind,source={shown},target=/models/{model_name} \\\n"
            f"      -e MODEL_NAME={model_name} -t tensorflow/serving",
            "",
            "REST request (the bytes of the prompt as token ids; one row per sequence):",
            "",
            f"  curl -s -X POST http://localhost:8501/v1/models/{model_name}:predict \\\n"
            f"      -d '{json.dumps(request_body)}'",
            "",
            "Response (logits (batch, length, 256); each row shortened here to 3 values):",
            "",
            "  " + json.dumps(_shorten(response_body)),
            "",
            'Streaming over REST: POST {"signature_name": "initial_state", "inputs": '
            '{"batch_size": 1}}, then per token {"signature_name": "decode_step", '
            '"inputs": {"token_ids": [t], "position": [p], "state_0": ..., ...}} and '
            "feed the returned state_i back.",
        ]
    )


def grpc_request_snippet(model_name, ids):
    """Builds a gRPC `PredictRequest` for `ids` and returns (client code, request byte size)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = "serving_default"
    request.inputs["token_ids"].CopyFrom(tf.make_tensor_proto(np.asarray(ids, np.int32)))
    code = f"""\
import grpc, numpy as np, tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

channel = grpc.insecure_channel("localhost:8500")
stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
request = predict_pb2.PredictRequest()
request.model_spec.name = "{model_name}"
request.model_spec.signature_name = "serving_default"
ids = np.frombuffer("def ".encode(), np.uint8).astype(np.int32)[None]  # (1, L)
request.inputs["token_ids"].CopyFrom(tf.make_tensor_proto(ids))
logits = tf.make_ndarray(stub.Predict(request, 10.0).outputs["logits"])  # (1, L, 256)"""
    return code, request.ByteSize()


def main(
    keras_model=None,
    output=DEFAULT_OUTPUT,
    version=1,
    model_name="favor_lm",
    steps=150,
    batch_size=16,
    sequence_length=128,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=256,
    num_random_features=32,
    max_train_bytes=2_000_000,
    check_length=512,
    prompt=DEFAULT_PROMPT,
    num_tokens=64,
    saved_model_cli=True,
    tolerance=1e-3,
    seed=0,
    verbose=1,
):
    """Exports, verifies and explains serving; returns a dict of the checks.

    Args:
        keras_model: a `.keras` language model to export (token_ids -> logits), or None to
            train a tiny one (the following size and training arguments).
        output: the SavedModel base directory (`--model_base_path`); the model goes to
            `<output>/<version>/` (replaced if it exists).
        version: the version directory.
        model_name: the TF Serving model name used in the printed commands.
        steps, batch_size, sequence_length, width, num_heads, num_blocks, intermediate_dim,
            num_random_features, max_train_bytes: the tiny model and its training.
        check_length: the length of the sequences compared with Keras.
        prompt: the text the streamed continuation starts from.
        num_tokens: bytes generated through ``decode_step`` (greedy).
        saved_model_cli: also check with ``saved_model_cli run`` (a subprocess, a few seconds).
        tolerance: the largest |logit difference| accepted.
        seed: seeds the tiny model and the data.
        verbose: Keras progress bars (1) or quiet (0).
    """
    from keras_favor import export
    from keras_favor.export.saved_model import saved_model_signature_names
    from keras_favor.export.testing import SavedModelSession, rest_predict, saved_model_cli_run

    model = load_or_train_model(
        keras_model,
        steps=steps,
        batch_size=batch_size,
        sequence_length=sequence_length,
        width=width,
        num_heads=num_heads,
        num_blocks=num_blocks,
        intermediate_dim=intermediate_dim,
        num_random_features=num_random_features,
        max_train_bytes=max_train_bytes,
        seed=seed,
        verbose=verbose,
    )
    saved_model_dir = export.export_saved_model(model, output, version=version, overwrite=True)
    signatures = saved_model_signature_names(saved_model_dir)
    print(f"\nExported {saved_model_dir}\nSignatures: {', '.join(signatures)}")
    differences = {}

    # 1. The C API loader (as TF Serving), serving_default on a batch of two sequences.
    corpus_tokens = data.load_corpus(200_000, 200_000).validation
    ids = np.stack(
        [corpus_tokens[:check_length], corpus_tokens[check_length : 2 * check_length]]
    ).astype("int32")
    expected = keras_logits(model, ids)
    with SavedModelSession(saved_model_dir) as session:
        got = session.run({"token_ids": ids})["logits"]
        differences["c_api_serving_default"] = float(np.max(np.abs(got - expected)))

        # 2. TF Serving's REST formats, answered through the same loader.
        prompt_ids = data.encode(prompt)
        row_request = {"instances": [prompt_ids.tolist()]}
        row_response = rest_predict(session, json.dumps(row_request))
        prompt_logits = keras_logits(model, prompt_ids[None])
        differences["rest_instances"] = float(
            np.max(np.abs(np.asarray(row_response["predictions"]) - prompt_logits))
        )
        column_response = rest_predict(session, {"inputs": {"token_ids": ids.tolist()}})
        differences["rest_inputs"] = float(
            np.max(np.abs(np.asarray(column_response["outputs"]) - expected))
        )

        # 3. Streaming: initial_state, then one decode_step per token.
        generated, step_logits = stream(session.run, prompt_ids, num_tokens)
        full = keras_logits(model, np.concatenate([prompt_ids, generated])[None, :-1])[0]
        differences["c_api_decode_step"] = float(np.max(np.abs(step_logits - full)))
        # ... and the same two signatures through TF Serving's REST format.
        rest_state = rest_predict(
            session, {"signature_name": "initial_state", "inputs": {"batch_size": 1}}
        )["outputs"]
        rest_step = rest_predict(
            session,
            {
                "signature_name": "decode_step",
                "inputs": dict(rest_state, token_ids=[int(prompt_ids[0])], position=[0]),
            },
        )["outputs"]
        differences["rest_decode_step"] = float(
            np.max(np.abs(np.asarray(rest_step["logits"][0]) - full[0]))
        )
        state_shapes = {
            name: list(value.shape)
            for name, value in session.run({"batch_size": np.int32(1)}, "initial_state").items()
        }
    if saved_model_cli:
        cli = saved_model_cli_run(saved_model_dir, {"token_ids": ids[:, :64]})
        differences["saved_model_cli"] = float(np.max(np.abs(cli["logits"] - expected[:, :64])))

    print(
        f"Streamed through decode_step (greedy): {data.decode(prompt_ids)!r} -> "
        f"{data.decode(generated)!r}"
    )
    print(f"Decode state per sequence: {state_shapes} (fixed, whatever the length)")
    print("Largest |logit difference| from Keras:")
    for name, value in differences.items():
        print(f"  {name:<24} {value:.2e}")
    bad = {name: value for name, value in differences.items() if not value <= tolerance}
    if bad:
        raise RuntimeError(f"The SavedModel disagrees with Keras beyond {tolerance}: {bad}")

    print(
        "\n" + serving_instructions(os.path.abspath(output), model_name, row_request, row_response)
    )
    code, size = grpc_request_snippet(model_name, prompt_ids[None])
    print(f"\ngRPC client (tensorflow-serving-api; this PredictRequest is {size} bytes):\n")
    print("\n".join("  " + line for line in code.splitlines()))
    return {
        "saved_model_dir": saved_model_dir,
        "signatures": signatures,
        "differences": differences,
        "generated": data.decode(generated),
        "state_shapes": state_shapes,
        "row_response": row_response,
    }


if __name__ == "__main__":
    main(
        **data.parse_main_arguments(
            main, helps={"keras_model": "a .keras LM to export (default: train a tiny one)"}
        )
    )
