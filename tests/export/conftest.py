"""Shared tiny models and exported artifacts for the export tests (TensorFlow backend only).

Models are tiny (E=16, 2 heads, M=16 random features, chunk 4) so that every export and
conversion takes about a second; artifacts are exported once per session.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before keras imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_favor.layers import (  # noqa: E402
    FavorAttention,
    FavorTransformerDecoder,
    TokenAndPositionEmbedding,
)

WIDTH = 16
VOCAB = 32


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason="keras_favor.export needs the TensorFlow backend")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


def attention_model(
    causal,
    feature_map="softmax_positive",
    vocab=WIDTH,
    width=WIDTH,
    key_dim=8,
    num_random_features=16,
):
    """tokens (B, L, E) -> FavorAttention self-attention -> Dense logits (B, L, vocab)."""
    keras.utils.set_random_seed(0)  # the same weights in every run
    tokens = keras.Input((None, width), name="tokens")
    attention = FavorAttention(
        2,
        key_dim,
        num_random_features=num_random_features,
        feature_map=feature_map,
        causal_chunk_size=4,
        seed=1,
        name="attention",
    )
    x = attention(tokens, tokens, use_causal_mask=causal)
    return keras.Model(tokens, keras.layers.Dense(vocab, name="logits")(x))


def language_model(position="learned", rotary=False, mask_zero=False, **block_kwargs):
    """token_ids (B, L) -> embedding -> 2 FavorTransformerDecoder -> Dense logits (B, L, V)."""
    keras.utils.set_random_seed(0)
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(
        VOCAB,
        64 if position == "learned" else None,
        WIDTH,
        position_embedding_type=position,
        mask_zero=mask_zero,
    )(token_ids)
    for i in range(2):
        x = FavorTransformerDecoder(
            32,
            2,
            num_random_features=16,
            causal_chunk_size=4,
            seed=i,
            use_rotary_embedding=rotary,
            **block_kwargs,
        )(x)
    return keras.Model(token_ids, keras.layers.Dense(VOCAB, name="logits")(x))


def under_policy(policy, build, *args, **kwargs):
    """`build(*args, **kwargs)` under the global dtype policy `policy`, restored afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build(*args, **kwargs)
    finally:
        keras.config.set_dtype_policy(previous)


def random_tokens(batch, length, seed=0):
    return np.random.RandomState(seed).randn(batch, length, WIDTH).astype("float32")


def random_ids(batch, length, seed=0):
    return np.random.RandomState(seed).randint(1, VOCAB, (batch, length)).astype("int32")


def stream(run, batch, ids, mask=None):
    """Decodes `ids` (B, L) position by position with `run(signature, inputs) -> outputs`.

    Returns the stacked logits (B, L, V).
    """
    state = run("initial_state", {"batch_size": np.int32(batch)})
    logits = []
    for t in range(ids.shape[1]):
        inputs = dict(state, token_ids=ids[:, t], position=np.full((batch,), t, "int32"))
        outputs = run("decode_step", inputs)
        logits.append(outputs.pop("logits"))
        state = outputs
    return np.stack(logits, axis=1)


@pytest.fixture(scope="session")
def lm():
    model = language_model()
    model(random_ids(1, 3))
    return model


@pytest.fixture(scope="session")
def lm_export(lm, tmp_path_factory):
    """The language model exported with its decode signatures: <base>/1."""
    from keras_favor.export import export_saved_model

    return export_saved_model(lm, tmp_path_factory.mktemp("lm"), version=1)


@pytest.fixture(scope="session")
def attention_exports(tmp_path_factory):
    """{causal: (model, SavedModel dir)} for the single-FavorAttention model."""
    from keras_favor.export import export_saved_model

    result = {}
    for causal in (False, True):
        model = attention_model(causal)
        path = export_saved_model(model, tmp_path_factory.mktemp(f"attention_{causal}"), 1)
        result[causal] = (model, path)
    return result
