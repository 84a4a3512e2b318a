"""Property-based tests of `FavorAttention` and streaming decoding over random configurations.

Properties:
- `get_initial_state` / `step`, position by position, equal the causal call, for self-attention
  and for distinct query and value inputs;
- `keras_favor.decode_step` on a small decoder language model (1-2 blocks; learned, sinusoidal or
  rotary positions; pre- or post-norm; left-padded batches) equals the full forward;
- a key padding mask (`value_mask`) equals truncation, causal and not;
- under `mixed_float16` and `mixed_bfloat16`, outputs are finite and in the compute dtype.

Configurations: every feature map of `tests/ops/reference.py` (names, configs, a user map),
N ≤ 3, key_dim ≤ 6, value_dim ≤ 4, M ≤ 12, lengths ≤ 10, chunks from 1 to past the length.
Budgets and profiles: `tests/properties.py` and `tests/conftest.py`.
"""

import keras
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import keras_favor
from keras_favor import FavorAttention
from tests import properties
from tests.layers.test_streaming import language_model, token_ids
from tests.ops import reference
from tests.testing import assert_close_to_scale

# The op's tolerance (see tests/ops/test_properties.py: float32 summed in another order, relative
# to the output's scale, times κ for softmax_trig); the output projection sums N·D head outputs
# with O(1) weights, which keeps the error relative to the output's scale of the same order (the
# "explore" profile's largest error on TensorFlow, with the op's tests: 1.4e-6 of the scale·κ).
TOLERANCE = 1e-5
MAX_CONDITION = 100.0  # as in tests/ops/test_properties.py

CASES = list(reference.MAP_CASES)


@st.composite
def layer_configs(draw, cases=CASES, max_length=10):
    """FavorAttention arguments, and the lengths, batch, widths and data seed to call it with."""
    case = draw(st.sampled_from(cases))
    length = draw(st.integers(1, max_length))
    init = dict(
        num_heads=draw(st.integers(1, 3)),
        key_dim=draw(st.integers(1, 6)),
        value_dim=draw(st.one_of(st.none(), st.integers(1, 4))),
        output_shape=draw(st.one_of(st.none(), st.integers(1, 5))),
        feature_map=reference.MAP_CASES[case][0],
        num_random_features=draw(st.integers(1, 12)),
        causal_chunk_size=draw(properties.chunk_sizes(length)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    call = dict(
        case=case,
        batch=draw(st.integers(1, 2)),
        length=length,
        query_width=draw(st.integers(1, 8)),
        value_width=draw(st.integers(1, 8)),
        self_attention=draw(st.booleans()),
        data_seed=draw(properties.seeds()),
    )
    return init, call


def built_layer(init, call, **kwargs):
    layer = FavorAttention(**init, **kwargs)
    value_width = call["query_width"] if call["self_attention"] else call["value_width"]
    layer.build((None, None, call["query_width"]), (None, None, value_width))
    return layer


def inputs(call, scale=1.0):
    """Query and value inputs (B, L, E) N(0, scale²); the same tensor for self-attention."""
    b, length = call["batch"], call["length"]
    xq, xv = properties.normal(
        call["data_seed"], (b, length, call["query_width"]), (b, length, call["value_width"])
    )
    xq, xv = scale * xq, scale * xv
    return (xq, xq) if call["self_attention"] else (xq, xv)


def condition(layer, case, q, k, **kwargs):
    """κ of the layer's projected queries q and keys k (see `properties.normaliser_condition`)."""
    w = None if layer.projection_matrix is None else properties.numpy(layer.projection_matrix.value)
    kappa = properties.normaliser_condition(reference.MAP_CASES[case][1], q, k, w, **kwargs)
    assume(kappa < MAX_CONDITION)
    return kappa


# ---------------------------------------------------------------------------------------------
# Streaming equals the full forward.


@properties.examples(8, jax=3)
@given(config=layer_configs())
def test_layer_steps_equal_the_causal_call(config):
    init, call = config
    layer = built_layer(init, call)
    xq, xv = inputs(call)
    full, q, k = properties.run(
        lambda xq, xv: (
            layer(xq, xv, use_causal_mask=True),
            layer.query_dense(xq),
            layer.key_dense(xv),
        ),
        xq,
        xv,
    )
    kappa = condition(layer, call["case"], q, k, causal=True)
    step = properties.compiled(layer.step)
    state = layer.get_initial_state(call["batch"])
    for t in range(call["length"]):
        out, state = step(xq[:, t], xv[:, t], state)
        assert_close_to_scale(properties.numpy(out), full[:, t], TOLERANCE * kappa)


@st.composite
def language_models(draw):
    """A small decoder-only model (`test_streaming.language_model`) and left-padded token ids."""
    positions = draw(st.sampled_from(["learned", "sine", "rotary"]))
    case = draw(st.sampled_from([c for c in CASES if c != "softmax_trig"]))
    length = draw(st.integers(1, 8))
    kwargs = dict(
        num_layers=draw(st.integers(1, 2)),
        position_embedding_type=None if positions == "rotary" else positions,
        use_rotary_embedding=positions == "rotary",
        normalize_first=draw(st.booleans()),
        final_norm=draw(st.booleans()),
        mask_zero=True,
        num_heads=draw(st.sampled_from([1, 2, 4])),  # divides the model width, 8
        feature_map=reference.MAP_CASES[case][0],
        num_random_features=draw(st.integers(1, 12)),
        causal_chunk_size=draw(properties.chunk_sizes(length)),
    )
    batch = draw(st.integers(1, 3))
    ids = token_ids(batch, length, seed=draw(properties.seeds()))
    padding = [draw(st.integers(0, length - 1)) for _ in range(batch)]  # ≥ 1 real token
    if length > 1 and not any(padding):
        padding[-1] = draw(st.integers(1, length - 1))  # a left-padded row whenever one fits
    for row, count in enumerate(padding):
        ids[row, :count] = 0
    return kwargs, ids


@properties.examples(4, jax=2)
@given(example=language_models())
def test_decode_step_equals_the_full_forward(example):
    # softmax_trig is left out: its decode is checked above and in the op's properties with a
    # tolerance from its conditioning, which a model of several blocks does not have.
    kwargs, ids = example
    model = language_model(**kwargs)

    full = properties.run(lambda ids: model(ids, training=False), ids)
    step = properties.compiled(
        lambda token, position, state: keras_favor.decode_step(model, token, position, state)
    )
    state = keras_favor.initial_decode_state(model, ids.shape[0])
    for t in range(ids.shape[1]):
        logits, state = step(ids[:, t], np.int32(t), state)
        real = ids[:, t] != 0  # padded positions have no output to compare
        assert_close_to_scale(properties.numpy(logits)[real], full[real, t], TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Padding equals truncation.


@pytest.mark.parametrize("causal", [True, False])
@properties.examples(6, jax=2)
@given(config=layer_configs(), data=st.data())
def test_value_mask_equals_truncation(causal, config, data):
    # Padded positions hold other inputs (up to 100 times larger) and must not matter: row by
    # row, the masked output equals the output on the real positions alone (causal: at the real
    # positions).
    init, call = config
    call["self_attention"] = call["self_attention"] or causal  # causal: one input sequence
    layer = built_layer(init, call)
    xq, xv = inputs(call)
    mask = data.draw(properties.padding_masks(call["batch"], call["length"]), label="mask")
    garbage = data.draw(st.sampled_from([0.0, 1.0, 1e2]), label="padded inputs")
    pad = ~mask[:, :, None]
    xv = np.where(pad, properties.normal(call["data_seed"] + 1, xv.shape, scale=garbage)[0], xv)
    if causal:
        xq = xv
    rows = []  # (query, value) inputs of each row's real positions alone
    for row, real in enumerate(mask):
        rows.append(
            (xq[row : row + 1, real] if causal else xq[row : row + 1], xv[row : row + 1, real])
        )

    def padded_and_alone(xq, xv, mask, rows):
        alone = [
            (layer(rq, rv, use_causal_mask=causal), layer.query_dense(rq), layer.key_dense(rv))
            for rq, rv in rows
        ]
        return layer(xq, xv, use_causal_mask=causal, value_mask=mask), alone

    out, alone = properties.run(padded_and_alone, xq, xv, mask, rows)
    for row, (want, q, k) in enumerate(alone):
        real = mask[row]
        kappa = condition(layer, call["case"], q, k, causal=causal)
        got = out[row : row + 1, real] if causal else out[row : row + 1]
        assert_close_to_scale(got, want, TOLERANCE * kappa)


# ---------------------------------------------------------------------------------------------
# Mixed precision.


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@properties.examples(5, jax=2)
@given(config=layer_configs(cases=[c for c in CASES if c != "softmax_trig"]), data=st.data())
def test_mixed_precision_outputs_are_finite(policy, config, data):
    # Inputs N(0, s²) with s up to 4: the activations a layer sees after a LayerNorm (s = 1) and
    # the scale at which float16 key features overflowed before features moved to float32.
    # softmax_trig is left out: its signed normaliser can cancel for inputs in any range, so its
    # outputs are unbounded (documented as an unstable baseline).
    init, call = config
    causal = data.draw(st.booleans(), label="causal")
    call["self_attention"] = call["self_attention"] or causal
    scale = data.draw(st.sampled_from([1.0, 2.0, 4.0]), label="input scale")
    mask = data.draw(
        st.one_of(st.none(), properties.padding_masks(call["batch"], call["length"])),
        label="mask",
    )
    layer = built_layer(init, call, dtype=policy)
    out_dtypes = []

    def mixed(xq, xv, mask):
        out = layer(xq, xv, use_causal_mask=causal, value_mask=mask)
        out_dtypes.append(keras.backend.standardize_dtype(out.dtype))
        return keras.ops.cast(out, "float32")  # exact: float16 and bfloat16 embed in float32

    out = properties.run(mixed, *inputs(call, scale), mask)
    assert out_dtypes == [layer.compute_dtype]
    assert np.all(np.isfinite(out))
