"""Property-based tests of the FAVOR ops over random shapes, maps, chunk sizes and masks.

Properties:
- `favor_attention` equals the explicit quadratic form D⁻¹ (φ(Q)φ(K)ᵀ ⊙ tril) V in float64, built
  from the same features, for every map: deterministic maps, and random-feature maps with a fixed
  projection ω (with ω fixed, φ is deterministic);
- key padding equals truncation, causal and not, from no padding to every key but one padded,
  whatever the padded positions hold;
- `favor_attention_step` from `favor_initial_state`, position by position, equals causal
  `favor_attention`;
- float16 and bfloat16 inputs give finite outputs in their own dtype.

Shapes: B ≤ 2, N ≤ 3, H ≤ 8, D ≤ 4, M ≤ 12, lengths ≤ 12 (sometimes 65-80 positions in more than
64 chunks), chunks from 1 to past the length. Budgets and profiles: `tests/properties.py` and
`tests/conftest.py`.
"""

import keras
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from keras_favor.ops import favor_attention, favor_attention_step, favor_initial_state
from tests import properties
from tests.ops import reference
from tests.testing import assert_close_to_scale

# float32 against float64, or float32 summed in another order (chunks, steps, truncation): the
# inputs are O(1), every output is a weighted mean of O(1) values (for non-negative features),
# and sums run over at most 80 keys and 24 features. The largest error the "explore" profile
# found (about 3800 comparisons, TensorFlow and JAX) was 2e-6 of the output's scale: a 5x
# margin. Times κ, the amplification by cancelling signed features (softmax_trig, see
# `properties.normaliser_condition`). An off-by-one in a mask moves outputs by O(0.1-1).
TOLERANCE = 1e-5
# softmax_trig examples whose normaliser cancels by more than this are skipped: a tolerance
# scaled by a larger κ would be too loose to test anything.
MAX_CONDITION = 100.0

CASES = list(reference.MAP_CASES)


class Problem:
    """One drawn attention problem: map case, shapes, chunk, mask and the data's seed."""

    def __init__(self, case, batch, heads, key_dim, value_dim, features, t, s, chunk, seed, scale):
        self.case, self.batch, self.heads = case, batch, heads
        self.key_dim, self.value_dim, self.features = key_dim, value_dim, features
        self.t, self.s, self.chunk, self.seed, self.scale = t, s, chunk, seed, scale
        self.mask = None
        self.identifier, self.map_name, self.ref_kwargs = reference.MAP_CASES[case]

    def __repr__(self):
        return f"Problem({self.__dict__})"

    def tensors(self):
        """q (B, T, N, H) and k (B, S, N, H) N(0, scale²), v (B, S, N, D) N(0, 1), and ω (M, H)
        N(0, 1) for random-feature maps (any fixed ω: the op must equal the estimator it
        defines), else None."""
        b, n = self.batch, self.heads
        q, k, v, w = properties.normal(
            self.seed,
            (b, self.t, n, self.key_dim),
            (b, self.s, n, self.key_dim),
            (b, self.s, n, self.value_dim),
            (self.features, self.key_dim),
        )
        q, k = q * self.scale, k * self.scale
        return q, k, v, (w if self.case in reference.RANDOM_CASES else None)

    def favor(self, q, k, v, w, *, causal, key_padding_mask=None):
        """`favor_attention` on this problem's map and chunk (a tensor; call it inside `run`)."""
        return favor_attention(
            q,
            k,
            v,
            self.identifier,
            w,
            causal=causal,
            key_padding_mask=key_padding_mask,
            chunk_size=self.chunk,
        )

    def expected(self, q, k, v, w, **kwargs):
        return reference.map_attention(self.map_name, q, k, v, w, **kwargs, **self.ref_kwargs)

    def condition(self, q, k, w, **kwargs):
        kappa = properties.normaliser_condition(self.map_name, q, k, w, **kwargs)
        assume(kappa < MAX_CONDITION)
        return kappa


@st.composite
def problems(draw, causal, padded=False, cases=CASES, long_sequences=True):
    case = draw(st.sampled_from(cases))
    if causal:
        t, chunk = draw(properties.causal_geometries(long_sequences))
        s = t
    else:
        t, s = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        chunk = draw(properties.chunk_sizes(t))  # unused by the non-causal op: any value works
    problem = Problem(
        case,
        batch=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        key_dim=draw(st.integers(1, 8)),
        value_dim=draw(st.integers(1, 4)),
        features=draw(st.integers(1, 12)),
        t=t,
        s=s,
        chunk=chunk,
        seed=draw(properties.seeds()),
        scale=draw(st.sampled_from([0.25, 0.5, 1.0])),
    )
    if padded:
        problem.mask = draw(properties.padding_masks(problem.batch, s))
    return problem


# ---------------------------------------------------------------------------------------------
# The op equals the explicit quadratic form built from the same features.


@pytest.mark.parametrize("causal", [True, False])
@properties.examples(10, jax=5)
@given(data=st.data())
def test_equals_the_masked_quadratic_form(causal, data):
    problem = data.draw(problems(causal), label="problem")
    q, k, v, w = problem.tensors()
    kappa = problem.condition(q, k, w, causal=causal)
    out = properties.run(lambda q, k, v, w: problem.favor(q, k, v, w, causal=causal), q, k, v, w)
    assert_close_to_scale(out, problem.expected(q, k, v, w, causal=causal), TOLERANCE * kappa)


# ---------------------------------------------------------------------------------------------
# Padding equals truncation.


@pytest.mark.parametrize("causal", [True, False])
@properties.examples(8, jax=4)
@given(data=st.data())
def test_key_padding_equals_truncation(causal, data):
    # Padded positions hold other data (up to 1e4: features that overflow, or dominate every
    # stabiliser) and must not matter. Row by row, the masked output equals the output on the
    # real keys alone: non-causal, every query attends to the row's real keys; causal, the
    # output at the j-th real position equals position j of the real positions alone (the
    # queries at padded positions are dropped).
    problem = data.draw(problems(causal, padded=True), label="problem")
    garbage = data.draw(st.sampled_from([0.0, 1.0, 1e2, 1e4]), label="padded values")
    q, k, v, w = problem.tensors()
    mask = problem.mask
    pad = ~mask[:, :, None, None]
    other_k, other_v = properties.normal(problem.seed + 1, k.shape, v.shape, scale=garbage)
    k, v = np.where(pad, other_k, k), np.where(pad, other_v, v)
    if causal:
        q = np.where(pad, properties.normal(problem.seed + 2, q.shape, scale=garbage)[0], q)
    rows = []  # (q, k, v) of each row's real positions alone
    for row, real in enumerate(mask):
        rq = q[row : row + 1, real] if causal else q[row : row + 1]
        rows.append((rq, k[row : row + 1, real], v[row : row + 1, real]))
    kappas = [problem.condition(rq, rk, w, causal=causal) for rq, rk, _ in rows]

    def padded_and_alone(q, k, v, w, mask, rows):
        alone = [problem.favor(*row, w, causal=causal) for row in rows]
        return problem.favor(q, k, v, w, causal=causal, key_padding_mask=mask), alone

    out, alone = properties.run(padded_and_alone, q, k, v, w, mask, rows)
    for row, real in enumerate(mask):
        got = out[row : row + 1, real] if causal else out[row : row + 1]
        assert_close_to_scale(got, alone[row], TOLERANCE * kappas[row])


# ---------------------------------------------------------------------------------------------
# Decoding steps equal the causal op.


@properties.examples(8, jax=4)
@given(problem=problems(causal=True, long_sequences=False))
def test_steps_equal_the_causal_op(problem):
    q, k, v, w = problem.tensors()
    kappa = problem.condition(q, k, w, causal=True)

    state = favor_initial_state(
        problem.batch,
        problem.heads,
        problem.key_dim,
        problem.value_dim,
        problem.identifier,
        problem.features if w is not None else None,
    )
    step = properties.compiled(
        lambda q, k, v, state, w: favor_attention_step(q, k, v, state, problem.identifier, w)
    )
    full = properties.run(lambda q, k, v, w: problem.favor(q, k, v, w, causal=True), q, k, v, w)
    for t in range(problem.t):
        out, state = step(q[:, t], k[:, t], v[:, t], state, w)
        assert_close_to_scale(properties.numpy(out), full[:, t], TOLERANCE * kappa)


# ---------------------------------------------------------------------------------------------
# Half-precision inputs.


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@properties.examples(6, jax=3)
@given(data=st.data())
def test_half_precision_inputs_give_finite_outputs(dtype, data):
    # Inputs with entries uniform in [-a, a], a up to 30: beyond the activations of trained
    # models (post-LayerNorm projections are O(1)-O(10)), and 30² = 900 > float16's exp range.
    # softmax_trig is left out: its signed normaliser can cancel to any small value for inputs
    # in any range, so its outputs are unbounded (documented as an unstable baseline).
    causal = data.draw(st.booleans(), label="causal")
    cases = [c for c in CASES if c != "softmax_trig"]
    problem = data.draw(problems(causal, padded=True, cases=cases), label="problem")
    bound = data.draw(st.sampled_from([1.0, 4.0, 30.0]), label="entries in [-a, a]")
    rng = np.random.default_rng(problem.seed)
    *qkv, w = problem.tensors()
    q, k, v = (rng.uniform(-bound, bound, size=x.shape).astype("float32") for x in qkv)

    out_dtypes = []

    def half(q, k, v, w, mask):
        q, k, v = (keras.ops.cast(x, dtype) for x in (q, k, v))
        out = problem.favor(q, k, v, w, causal=causal, key_padding_mask=mask)
        out_dtypes.append(keras.backend.standardize_dtype(out.dtype))
        return keras.ops.cast(out, "float32")  # exact: float16 and bfloat16 embed in float32

    out = properties.run(half, q, k, v, w, problem.mask)
    assert out_dtypes == [dtype]
    assert out.shape == (problem.batch, problem.t, problem.heads, problem.value_dim)
    assert np.all(np.isfinite(out))
