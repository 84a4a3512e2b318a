"""Plain numpy float64 references for the FAVOR tests.

Shape legend: B batch, T query length, S key length, N heads, H key dim, D value dim,
M random features, F features.

Everything here is written from the formulas (arXiv 2009.14794; arXiv 2205.15317 for FAVOR++),
independently of `keras_favor`, in the token-major layout (B, L, N, ·) of the public ops.
"""

import keras
import numpy as np

from keras_favor.feature_maps import FeatureMap

MAP_NAMES = (
    "softmax_positive",
    "softmax_hyperbolic",
    "softmax_optimal",
    "softmax_trig",
    "relu",
    "elu",
)
RANDOM_MAP_NAMES = MAP_NAMES[:5]
SOFTMAX_MAP_NAMES = MAP_NAMES[:4]


@keras.saving.register_keras_serializable(package="keras_favor_tests")
class SquaredPlusOffset(FeatureMap):
    """A user-defined deterministic map: φ(x) = x² + offset (H features, positive)."""

    def __init__(self, offset=0.1):
        self.offset = offset

    def features(self, x, projection_matrix=None, *, is_query):
        return keras.ops.square(x) + self.offset

    def get_config(self):
        return {"offset": self.offset}


def to_numpy(x):
    """A backend tensor (any dtype, bfloat16 included) as a float64 numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), dtype=np.float64)


def optimal_a(rho):
    """FAVOR++'s variance-minimising A* for ρ (any shape)."""
    rho = np.asarray(rho, dtype=np.float64)
    return (1.0 - 2.0 * rho - np.sqrt((2.0 * rho + 1.0) ** 2 + 8.0 * rho)) / 16.0


def optimal_rho(query, key, key_padding_mask=None):
    """ρ = φ̄/H per (batch, head), φ̄ = mean‖x‖² + mean‖y‖² + 2 x̄ᵀȳ over queries x and real keys y.

    query (B, T, N, H), key (B, S, N, H) unscaled; x = q·H^(-1/4). Returns (B, N).
    """
    dim = query.shape[-1]
    x = query * dim**-0.25
    y = key * dim**-0.25
    mask = np.ones(key.shape[:2]) if key_padding_mask is None else key_padding_mask.astype(float)
    count = mask.sum(1)[:, None]  # (B, 1)
    mean_sq_x = (x**2).sum(-1).mean(1)  # (B, N)
    mean_sq_y = ((y**2).sum(-1) * mask[:, :, None]).sum(1) / count
    mean_x = x.mean(1)  # (B, N, H)
    mean_y = (y * mask[:, :, None, None]).sum(1) / count[:, :, None]
    phi_bar = mean_sq_x + mean_sq_y + 2.0 * (mean_x * mean_y).sum(-1)
    return np.maximum(phi_bar, 0.0) / dim


def features(name, x, projection=None, *, a=None, epsilon=1e-3, random_features=True, offset=0.1):
    """Features φ(x) (…, F) of the unscaled inputs x (B, L, N, H) in float64, with every constant.

    For the softmax maps, φ(q)ᵀφ(k) is the unbiased estimator of exp(qᵀk/√H). `a` is FAVOR++'s A,
    broadcastable to (B, 1, N, 1).
    """
    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[-1]
    if name == "squared":
        return x**2 + offset  # SquaredPlusOffset
    if name == "elu":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if name == "relu" and not random_features:
        return np.maximum(x, 0.0) + epsilon
    w = np.asarray(projection, dtype=np.float64)  # (M, H)
    m = w.shape[0]
    xs = x * dim**-0.25
    u = xs @ w.T  # (B, L, N, M)
    half_sq = 0.5 * (xs**2).sum(-1, keepdims=True)
    if name == "relu":
        return np.maximum(u, 0.0) + epsilon
    if name == "softmax_positive":
        return np.exp(u - half_sq) / np.sqrt(m)
    if name == "softmax_hyperbolic":
        return np.exp(np.concatenate([u, -u], -1) - half_sq) / np.sqrt(2 * m)
    if name == "softmax_trig":
        return np.exp(half_sq) * np.concatenate([np.sin(u), np.cos(u)], -1) / np.sqrt(m)
    if name == "softmax_optimal":
        a = np.asarray(a, dtype=np.float64)
        b = np.sqrt(1.0 - 4.0 * a)
        d = (1.0 - 4.0 * a) ** (dim / 4.0)
        omega_sq = (w**2).sum(-1)  # (M,)
        return d * np.exp(a * omega_sq + b * u - half_sq) / np.sqrt(m)
    raise ValueError(name)


def decay_weights(decay, length):
    """(N, L, L): γ_n^(t−s) for s ≤ t, else 0, for per-head rates `decay` (N,)."""
    lag = np.arange(length)[:, None] - np.arange(length)[None, :]
    rates = np.asarray(decay, np.float64)[:, None, None]
    return np.where(lag >= 0, rates ** np.maximum(lag, 0), 0.0)


def linear_attention(q_feat, k_feat, value, *, causal=False, key_padding_mask=None, decay=None):
    """Row-normalised φ(Q)φ(K)ᵀV computed explicitly with the T×S matrix, float64.

    q_feat (B, T, N, F), k_feat (B, S, N, F), value (B, S, N, D) -> (B, T, N, D). With `decay`
    (N,) (causal only), key s weighs γ^(t−s) in query t's numerator and normaliser.
    """
    scores = np.einsum("btnf,bsnf->bnts", q_feat, k_feat)
    if causal:
        scores = scores * np.tril(np.ones(scores.shape[-2:]))
    if decay is not None:
        scores = scores * decay_weights(decay, scores.shape[-1])
    if key_padding_mask is not None:
        scores = scores * key_padding_mask[:, None, None, :].astype(float)
    return np.einsum("bnts,bsnd->btnd", scores / scores.sum(-1, keepdims=True), value)


def softmax_attention(query, key, value, *, causal=False):
    """Exact softmax(QKᵀ/√H)V in float64."""
    scores = np.einsum("btnh,bsnh->bnts", query, key) / np.sqrt(query.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", weights, np.asarray(value, np.float64))


def map_attention(
    name,
    query,
    key,
    value,
    projection=None,
    *,
    causal=False,
    key_padding_mask=None,
    rho=None,
    decay=None,
    **kwargs,
):
    """The attention `favor_attention` must give for map `name`, computed explicitly in float64."""
    query, key, value = (np.asarray(t, np.float64) for t in (query, key, value))
    a = None
    if name == "softmax_optimal":
        if rho is None:
            rho = (
                2.0 / np.sqrt(query.shape[-1])
                if causal
                else optimal_rho(query, key, key_padding_mask)
            )
        a = optimal_a(rho)
        a = a[:, None, :, None] if np.ndim(a) == 2 else a  # (B, 1, N, 1)
    q_feat = features(name, query, projection, a=a, **kwargs)
    k_feat = features(name, key, projection, a=a, **kwargs)
    return linear_attention(
        q_feat, k_feat, value, causal=causal, key_padding_mask=key_padding_mask, decay=decay
    )


# Test cases: id -> (identifier passed to keras_favor, reference map name, reference kwargs).
MAP_CASES = {
    "softmax_positive": ("softmax_positive", "softmax_positive", {}),
    "softmax_hyperbolic": ("softmax_hyperbolic", "softmax_hyperbolic", {}),
    "softmax_optimal": ("softmax_optimal", "softmax_optimal", {}),
    "softmax_optimal_rho": (
        {"class_name": "SoftmaxOptimal", "config": {"rho": 0.3}},
        "softmax_optimal",
        {"rho": 0.3},
    ),
    "softmax_trig": ("softmax_trig", "softmax_trig", {}),
    "relu": ("relu", "relu", {}),
    "relu_deterministic": (
        {"class_name": "ReLU", "config": {"random_features": False, "epsilon": 0.01}},
        "relu",
        {"random_features": False, "epsilon": 0.01},
    ),
    "elu": ("elu", "elu", {}),
    "user_squared": (SquaredPlusOffset(0.1), "squared", {"offset": 0.1}),
}
DETERMINISTIC_CASES = ("relu_deterministic", "elu", "user_squared")
RANDOM_CASES = tuple(c for c in MAP_CASES if c not in DETERMINISTIC_CASES)


def hybrid_attention(
    name,
    query,
    key,
    value,
    projection=None,
    *,
    window,
    causal=False,
    key_padding_mask=None,
    decay=None,
    rho=None,
    **kwargs,
):
    """`favor_attention(..., local_window=window)` computed explicitly with T×S matrices, float64.

    Exact weights exp(s_ts − c_t) on the keys with |t − s| < window (causal: 0 ≤ t − s), c_t
    their largest score; the map's kernel φ(q_t)·φ(k_s) on the other visible keys, times
    α_t = Σ_window exp(s_ts − c_t) / Σ_window φ(q_t)·φ(k_s); decay γ^(t−s) on both; one
    normaliser. FAVOR++ with ρ = `rho`, or its causal 2/√H (non-causal FAVOR++ estimates ρ from
    the data: compare it with a fixed `rho`).
    """
    query, key, value = (np.asarray(t, np.float64) for t in (query, key, value))
    if name == "softmax_optimal":
        a = optimal_a(2.0 / np.sqrt(query.shape[-1]) if rho is None else rho)
    else:
        a = None
    kernel = np.einsum(
        "btnf,bsnf->bnts",
        features(name, query, projection, a=a, **kwargs),
        features(name, key, projection, a=a, **kwargs),
    )
    scores = np.einsum("btnh,bsnh->bnts", query, key) / np.sqrt(query.shape[-1])
    length = query.shape[1]
    lag = np.arange(length)[:, None] - np.arange(length)[None, :]
    visible = np.ones((length, length), bool) if not causal else lag >= 0
    visible = np.broadcast_to(visible, scores.shape)
    if key_padding_mask is not None:
        visible = visible & np.asarray(key_padding_mask, bool)[:, None, None, :]
    near = visible & (np.abs(lag) < window)
    far = visible & ~near
    top = np.where(near, scores, -np.inf).max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    exact = np.where(near, np.exp(np.where(near, scores, 0.0) - top), 0.0)
    kernel_mass = np.where(near, kernel, 0.0).sum(-1, keepdims=True)
    alpha = np.where(
        kernel_mass > 0, exact.sum(-1, keepdims=True) / np.where(kernel_mass > 0, kernel_mass, 1), 0
    )
    weights = exact + alpha * np.where(far, kernel, 0.0)
    if decay is not None:
        weights = weights * decay_weights(decay, length)
    total = weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", weights / np.where(total == 0, 1.0, total), value)
