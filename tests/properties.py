"""Shared pieces of the property-based tests (`tests/*/test_properties.py`): example budgets,
hypothesis strategies for shapes and masks, and the conditioning that sets their tolerances.

Shape legend: B batch, T query length, S key length, N heads, H key dim, D value dim,
M random features, F features, C chunk.

Hypothesis draws the shapes, the map, the chunk, the mask and an integer seed; the tensors come
from `numpy.random.default_rng(seed)` (cheap, and every failure prints the seed that rebuilds it).
"""

import keras
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from tests.ops import reference


def examples(n, jax=None):
    """Settings for a test that runs `n` examples under the "ci" profile (see `tests/conftest.py`)
    and proportionally more under a profile with a larger `max_examples` ("explore").

    `jax`, when given, replaces `n` on the JAX backend, for tests whose examples each build
    layers: a build draws its random projection and kernels eagerly, and eager JAX compiles every
    primitive for every new shape (1-3 s per layer), where TensorFlow takes milliseconds.
    """
    if jax is not None and keras.backend.backend() == "jax":
        n = jax
    ci = settings.get_profile("ci").max_examples
    return settings(max_examples=max(1, round(n * settings.default.max_examples / ci)))


def compiled(fn):
    """`fn` under `jax.jit` on the JAX backend, else `fn` itself (TensorFlow runs it eagerly).

    Every example has new shapes: eager JAX compiles each primitive for each new shape (0.1-2 s
    for one causal call), `jax.jit` compiles the whole function once (about 0.3 s). Each test
    therefore does an example's work in one or two compiled functions: the full forward, and one
    decoding step that is compiled once and called at every position. TensorFlow runs eagerly
    in milliseconds.
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def numpy(outputs):
    """Every tensor of `outputs` (any nesting) as a numpy array in its own dtype."""
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), outputs)


def run(fn, *args):
    """`compiled(fn)(*args)` as numpy arrays."""
    return numpy(compiled(fn)(*args))


def seeds():
    return st.integers(0, 2**32 - 1)


def chunk_sizes(length):
    """C from 1 to past the length: 1, divisors and non-divisors of L, and C > L (one chunk)."""
    return st.integers(1, length + 4)


@st.composite
def causal_geometries(draw, long_sequences=True):
    """(L, C) for causal attention: L ≤ 12 with any chunk; with `long_sequences`, one time in five
    65-80 positions in chunks of 1 or 2, i.e. more than 64 chunks, where the prefix sum over
    chunks switches from one triangular matmul to blocks of 32 chunks."""
    if long_sequences and draw(st.integers(0, 4)) == 4:
        return draw(st.integers(65, 80)), draw(st.integers(1, 2))
    length = draw(st.integers(1, 12))
    return length, draw(chunk_sizes(length))


@st.composite
def padding_masks(draw, batch, length):
    """(B, S) bool key padding masks with at least one real key per row: from no padding to every
    key but one padded, real keys anywhere (left, right or scattered)."""
    mask = np.zeros((batch, length), bool)
    for row in range(batch):
        num_real = draw(st.integers(1, length))
        order = draw(st.permutations(range(length)))
        mask[row, list(order[:num_real])] = True
    return mask


def normal(seed, *shapes, scale=1.0):
    """float32 N(0, scale²) arrays of the given shapes, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=shape)).astype("float32") for shape in shapes]


def normaliser_condition(map_name, query, key, projection=None, *, causal=False, mask=None):
    """κ = max over queries t of Σ_s |φ(q_t)·φ(k_s)| / |Σ_s φ(q_t)·φ(k_s)| (keys t attends to).

    Rounding errors of the sums in the numerator and normaliser are relative to Σ|·|; the
    normalised output divides by |Σ|, so they grow by κ. κ = 1 for maps whose features are
    non-negative (every map but `softmax_trig`); the signed trigonometric features can cancel,
    and then the output is ill-conditioned and only meets a tolerance scaled by κ.
    query (B, T, N, H), key (B, S, N, H), projection (M, H), mask (B, S) or None.
    """
    if map_name != "softmax_trig":
        return 1.0
    q_feat = reference.features(map_name, query, projection)
    k_feat = reference.features(map_name, key, projection)
    scores = np.einsum("btnf,bsnf->bnts", q_feat, k_feat)  # (B, N, T, S)
    visible = np.ones(scores.shape, bool)
    if causal:
        visible &= np.tril(np.ones(scores.shape[-2:], bool))
    if mask is not None:
        visible &= np.asarray(mask, bool)[:, None, None, :]
    scores = np.where(visible, scores, 0.0)
    total = np.abs(scores.sum(-1))
    attended = visible.any(-1)  # a query with no visible key has no normaliser to condition
    ratio = np.abs(scores).sum(-1)[attended] / np.maximum(total[attended], 1e-300)
    return float(ratio.max()) if ratio.size else 1.0
