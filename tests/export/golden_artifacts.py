"""Golden artifacts: tiny deployed-model files, committed, that every later version must still run.

Two tiny models, weights and random features fixed by seeds:

- ``favor_lm``: a causal language model. ``token_ids`` (B, L) int32 -> `TokenAndPositionEmbedding`
  (vocabulary 64, width 16, sinusoidal positions) -> 2 `FavorTransformerDecoder` blocks (2 heads,
  M=16 random features, chunk 4, rotary embeddings on the self-attention; the first post-LN, the
  second pre-LN) -> LayerNorm -> Dense -> ``logits`` (B, L, 64). Its SavedModel and `.tflite`
  carry the streaming signatures ``initial_state`` and ``decode_step``.
- ``favor_attention``: a non-causal encoder layer. ``tokens`` (B, L, 16) float32 and
  ``padding_mask`` (B, L) int32 (1 real, 0 padding) -> `FavorAttention` (2 heads, key_dim 8, M=16,
  padded keys removed) -> Dense -> ``outputs`` (B, L, 8).

For each model ``saved_models/golden/<name>/`` holds

- ``<name>.keras``: the Keras model file;
- ``1/``: the SavedModel in the TF Serving layout (``--model_base_path=saved_models/golden/<name>``;
  TF Serving ignores the other files there, whose names are not version numbers);
- ``<name>.tflite``: the builtin-ops float32 TFLite model with the same signatures;
- ``expected.npz``: inputs and the Keras model's outputs for them (see `expected_arrays`).

Regenerate them (only when a change is *meant* to break deployed models, and say so in the commit
message; tests/export/test_golden_artifacts.py checks the current code against them)::

    KERAS_BACKEND=tensorflow python -m tests.export.golden_artifacts
"""

import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_favor.layers import (  # noqa: E402
    FavorAttention,
    FavorTransformerDecoder,
    TokenAndPositionEmbedding,
)

GOLDEN_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "saved_models",
    "golden",
)
LM = "favor_lm"
ATTENTION = "favor_attention"
NAMES = (LM, ATTENTION)
VERSION = 1

VOCAB = 64
WIDTH = 16
NUM_HEADS = 2
NUM_RANDOM_FEATURES = 16
CHUNK = 4
ATTENTION_OUTPUTS = 8

# The stored inputs: lengths that cross chunk boundaries (chunk 4).
LM_BATCH, LM_LENGTH = 2, 11
DECODE_PREFIX = 6  # the stored single decode step runs at this position, from a filled state
ATTENTION_BATCH, ATTENTION_LENGTH = 2, 9
ATTENTION_REAL_LENGTHS = (9, 6)  # the second sequence has 3 padding positions


def build_lm():
    """The tiny causal language model (a fixed function of the seeds)."""
    keras.utils.set_random_seed(1234)
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(
        VOCAB, None, WIDTH, position_embedding_type="sine", name="embedding"
    )(token_ids)
    for i in range(2):
        x = FavorTransformerDecoder(
            intermediate_dim=32,
            num_heads=NUM_HEADS,
            num_random_features=NUM_RANDOM_FEATURES,
            causal_chunk_size=CHUNK,
            use_rotary_embedding=True,
            normalize_first=i == 1,
            seed=10 + i,
            name=f"decoder_{i}",
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(VOCAB, name="logits")(x)
    return keras.Model(token_ids, logits, name=LM)


def build_attention():
    """The tiny non-causal FavorAttention model with a key padding mask."""
    keras.utils.set_random_seed(5678)
    tokens = keras.Input((None, WIDTH), name="tokens")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    mask = keras.ops.cast(padding_mask, "bool")
    x = FavorAttention(
        NUM_HEADS,
        8,
        num_random_features=NUM_RANDOM_FEATURES,
        seed=20,
        name="attention",
    )(tokens, tokens, value_mask=mask)
    outputs = keras.layers.Dense(ATTENTION_OUTPUTS, name="outputs")(x)
    return keras.Model({"tokens": tokens, "padding_mask": padding_mask}, outputs, name=ATTENTION)


def lm_inputs():
    ids = np.random.RandomState(7).randint(1, VOCAB, (LM_BATCH, LM_LENGTH)).astype("int32")
    return {"token_ids": ids}


def attention_inputs():
    rng = np.random.RandomState(8)
    tokens = rng.randn(ATTENTION_BATCH, ATTENTION_LENGTH, WIDTH).astype("float32")
    mask = np.zeros((ATTENTION_BATCH, ATTENTION_LENGTH), "int32")
    for row, length in enumerate(ATTENTION_REAL_LENGTHS):
        mask[row, :length] = 1
    return {"tokens": tokens, "padding_mask": mask}


def _np(x):
    return keras.ops.convert_to_numpy(x)


def expected_arrays(name, model):
    """The arrays stored in ``expected.npz``: inputs and the Keras model's outputs.

    ``favor_lm``:
        ``token_ids`` (B, L) and ``logits`` (B, L, V): the ``serving_default`` call;
        ``decode_token_ids`` (B,), ``decode_position`` (B,), ``decode_in_state_<i>``: the inputs
        of one ``decode_step`` at position `DECODE_PREFIX` whose state comes from decoding the
        first `DECODE_PREFIX` tokens; ``decode_logits`` (B, V) and ``decode_out_state_<i>``: its
        outputs. Streaming every position from ``initial_state`` reproduces ``logits``.
    ``favor_attention``:
        ``tokens`` (B, L, E), ``padding_mask`` (B, L) and ``outputs`` (B, L, 8).
    """
    from keras_favor.layers import decode_step, initial_decode_state

    if name == ATTENTION:
        inputs = attention_inputs()
        return {**inputs, "outputs": _np(model(inputs))}
    inputs = lm_inputs()
    ids = inputs["token_ids"]
    arrays = {**inputs, "logits": _np(model(ids))}
    state = initial_decode_state(model, LM_BATCH)
    for t in range(DECODE_PREFIX):
        _, state = decode_step(model, ids[:, t], t, state)
    position = np.full((LM_BATCH,), DECODE_PREFIX, "int32")
    token = ids[:, DECODE_PREFIX]
    logits, new_state = decode_step(model, token, position, state)
    arrays.update(decode_token_ids=token, decode_position=position, decode_logits=_np(logits))
    for i, t in enumerate(keras.tree.flatten(state)):
        arrays[f"decode_in_state_{i}"] = _np(t)
    for i, t in enumerate(keras.tree.flatten(new_state)):
        arrays[f"decode_out_state_{i}"] = _np(t)
    return arrays


def artifact_paths(name, root=GOLDEN_DIR):
    """dict kind -> path: ``dir``, ``keras``, ``saved_model``, ``tflite``, ``expected``."""
    directory = os.path.join(root, name)
    return {
        "dir": directory,
        "keras": os.path.join(directory, f"{name}.keras"),
        "saved_model": os.path.join(directory, str(VERSION)),
        "tflite": os.path.join(directory, f"{name}.tflite"),
        "expected": os.path.join(directory, "expected.npz"),
    }


def write_artifacts(name, root=GOLDEN_DIR):
    """Builds model `name`, writes its four artifacts under ``<root>/<name>/``; returns paths."""
    from keras_favor import export

    model = {LM: build_lm, ATTENTION: build_attention}[name]()
    arrays = expected_arrays(name, model)  # builds the model too
    paths = artifact_paths(name, root)
    # Written next to the target, then swapped in, so a failure leaves the old artifacts.
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    try:
        new = artifact_paths(name, staging)
        os.makedirs(new["dir"])
        model.save(new["keras"])
        saved_model = export.export_saved_model(
            model, new["dir"], VERSION, decode=True if name == LM else None
        )
        export.export_tflite(saved_model, new["tflite"])
        np.savez(new["expected"], **arrays)
        if os.path.exists(paths["dir"]):
            shutil.rmtree(paths["dir"])
        os.replace(new["dir"], paths["dir"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def artifact_sizes(name, root=GOLDEN_DIR):
    """dict artifact -> size in bytes (a directory: the sum of its files)."""
    sizes = {}
    for kind, path in artifact_paths(name, root).items():
        if kind == "dir":
            continue
        if os.path.isdir(path):
            sizes[kind] = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
            )
        else:
            sizes[kind] = os.path.getsize(path)
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description="Regenerate the golden export artifacts.")
    parser.add_argument("--root", default=GOLDEN_DIR, help="directory of the artifacts")
    parser.add_argument("names", nargs="*", help=f"models to write (default: all of {NAMES})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NAMES))
    if unknown:
        parser.error(f"unknown model names {unknown}; expected some of {NAMES}")
    if keras.backend.backend() != "tensorflow":
        sys.exit("The golden artifacts need KERAS_BACKEND=tensorflow.")
    for name in args.names or NAMES:
        paths = write_artifacts(name, args.root)
        sizes = ", ".join(
            f"{k} {v / 1024:.0f} KiB" for k, v in artifact_sizes(name, args.root).items()
        )
        print(f"{os.path.relpath(paths['dir'])}: {sizes}")


if __name__ == "__main__":
    main()
