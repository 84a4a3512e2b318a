"""Linear (random-feature) attention: non-causal, exact chunked causal, and one decoding step.

Shape legend: B batch, T query length, S key length, N heads, H key dim, D value dim,
M random features, F output features of the feature map, C chunk, K number of chunks.

All three compute D⁻¹ φ(Q) (φ(K)ᵀ V) without forming a T×S matrix, in float32 (or, on the bfloat16
fast path of `matmul_dtype`, with bfloat16 products and float32 sums); outputs come back in
the dtype of `query`. Internally the head-major layout (B, N, L, ·) turns every contraction into a
plain batched matmul; causal attention uses the chunks-first layout (K, B, N, C, ·) from the inputs
on, so that its prefix sums over chunks are 2-D matmuls. The normaliser rides along as an extra
all-ones value column, so numerator and normaliser come out of the same matmuls.
"""

import math

import numpy as np
from keras import ops
from keras.backend import standardize_dtype

from keras_favor import feature_maps as feature_maps_lib
from keras_favor._checks import boolean, invalid, is_number, positive_int

DEFAULT_CHUNK_SIZE = 128
_PREFIX_BLOCK = 32  # chunks per block of the blocked prefix sum over chunks


DECAY_PRESETS = ("retnet",)
_DECAY_EXPECTED = "None, 'retnet', a number in (0, 1] or a list of one number in (0, 1] per head"


def decay_rates(num_heads, shortest_reach=32, longest_reach=None):
    """Per-head decay rates γ_h = 1 − 1/r_h of the causal state, reaches r_h spaced geometrically.

    A head with rate γ weighs a key t positions back by γ^t ≈ e^(−t/r): r = 1/(1 − γ) positions
    is its reach. The defaults are RetNet's rates, γ_h = 1 − 2^(−5−h) (reaches 32, 64, ...,
    32·2^(N−1)); `longest_reach` caps the slowest head (e.g. at the training window, so that no
    head reaches further than training showed it).

    Args:
        num_heads: N, a positive int.
        shortest_reach: r_0, the reach of the fastest head, a number > 1.
        longest_reach: r_(N−1), the reach of the slowest head, a number ≥ `shortest_reach`;
            defaults to `shortest_reach · 2^(N−1)`.

    Returns:
        A list of N floats in (0, 1), fastest head first.

    Example:

    >>> decay_rates(4)
    [0.96875, 0.984375, 0.9921875, 0.99609375]
    >>> [round(1 / (1 - g)) for g in decay_rates(3, 16, 256)]
    [16, 64, 256]
    """
    positive_int(num_heads, "num_heads")
    if not is_number(shortest_reach) or shortest_reach <= 1:
        raise invalid("shortest_reach", "a number > 1 (positions)", shortest_reach)
    if longest_reach is None:
        longest_reach = shortest_reach * 2.0 ** (num_heads - 1)
    if not is_number(longest_reach) or longest_reach < shortest_reach:
        raise invalid(
            "longest_reach", f"None or a number ≥ shortest_reach={shortest_reach}", longest_reach
        )
    # log2 of the reaches, so that powers of two (RetNet's rates) come out exact.
    low, span = math.log2(shortest_reach), math.log2(longest_reach / shortest_reach)
    step = span / (num_heads - 1) if num_heads > 1 else 0.0
    return [1.0 - 2.0 ** -(low + h * step) for h in range(num_heads)]


def head_decay(decay, num_heads, name="decay"):
    """The per-head rates (a tuple of N floats) of a `decay` argument, or None; checked.

    `decay` is None (no decay), `"retnet"` (`decay_rates(num_heads)`), one number in (0, 1] for
    every head, or a list of `num_heads` numbers in (0, 1] (1 keeps a head undecayed).
    """
    if decay is None:
        return None
    if isinstance(decay, str):
        if decay not in DECAY_PRESETS:
            raise invalid(name, _DECAY_EXPECTED, decay)
        return tuple(decay_rates(num_heads))
    values = [decay] * num_heads if is_number(decay) else decay
    if not isinstance(values, (list, tuple)) or not all(
        is_number(g) and 0 < g <= 1 for g in values
    ):
        raise invalid(name, _DECAY_EXPECTED, decay)
    if len(values) != num_heads:
        raise invalid(name, f"{_DECAY_EXPECTED}: num_heads={num_heads} numbers", decay)
    return tuple(float(g) for g in values)


def _log_decay(decay, num_heads, causal):
    """log γ per head, a float32 (N,) constant, or None; checks `decay` against `causal`."""
    if decay is None:
        return None
    if not causal:
        raise ValueError(
            "Argument `decay` (a decay of the causal state) needs `causal=True`: only causal "
            f"attention has a state that decays. Received: decay={decay!r}, causal={causal!r}"
        )
    if num_heads is None:
        raise ValueError(
            "Argument `decay` needs a known number of heads (axis 2 of `query`). "
            f"Received: decay={decay!r} with an unknown number of heads"
        )
    rates = head_decay(decay, num_heads)
    return ops.convert_to_tensor(np.log(np.asarray(rates, dtype=np.float64)), dtype="float32")


MATMUL_DTYPES = (None, "float32", "bfloat16")


def _low_dtype(feature_map, matmul_dtype, input_dtype):
    """The fast path's dtype ("bfloat16") or None (float32 throughout); checks `matmul_dtype`."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise invalid(
            "matmul_dtype",
            "None, 'float32' or 'bfloat16' (float16 cannot hold the causal key scales, up to "
            "e^40: float16 inputs compute in float32)",
            matmul_dtype,
        )
    if matmul_dtype == "float32":
        return None
    requested = "bfloat16" if matmul_dtype == "bfloat16" else standardize_dtype(input_dtype)
    low_dtype = feature_map._low_precision_dtype(requested)
    if matmul_dtype == "bfloat16" and low_dtype is None:
        raise ValueError(
            f"Argument `matmul_dtype='bfloat16'` needs a map with the bfloat16 fast path "
            "(softmax_positive, softmax_hyperbolic, softmax_optimal). "
            f"Received: matmul_dtype='bfloat16', feature_map={feature_map!r}"
        )
    return low_dtype


def _static_rank_check(x, rank, name, layout):
    if len(x.shape) != rank:
        raise ValueError(
            f"Argument `{name}` must have rank {rank} {layout}. "
            f"Received: {name}.shape={tuple(x.shape)}"
        )


def _check_dim(a, b, what):
    if a is not None and b is not None and a != b:
        raise ValueError(what)


def check_padding_mask(mask, name, batch, length):
    """Raises a ValueError naming `name` unless `mask` is (batch, length); None dims match."""
    shape = tuple(mask.shape)
    if (
        len(shape) != 2
        or (shape[0] is not None and batch is not None and shape[0] != batch)
        or (shape[1] is not None and length is not None and shape[1] != length)
    ):
        raise ValueError(
            f"Argument `{name}` must be a key padding mask of shape (batch, length) = "
            f"({batch}, {length}). Received: {name}.shape={shape}"
        )


def _check_state(s_state, z_state, s_expected, feature_map):
    # S (B, N, F, D) and z (B, N, F), F the number of features the map returned; None dims match.
    z_expected = s_expected[:3]
    for name, x, expected in (("state[0]", s_state, s_expected), ("state[1]", z_state, z_expected)):
        shape = tuple(x.shape)
        if len(shape) != len(expected) or any(
            a is not None and b is not None and a != b for a, b in zip(shape, expected)
        ):
            hint = ""
            if len(shape) == len(expected) and shape[2] != expected[2]:
                hint = (
                    f" The map returned F={expected[2]} features; the initial state's F comes "
                    "from its `output_dim(key_dim, num_random_features)`, which must return it."
                )
            raise ValueError(
                "Argument `state` must be the decoding state (S, z) of these inputs and "
                f"feature_map={feature_map!r}: S of shape (batch, num_heads, features, "
                f"value_dim) = {s_expected} and z of shape {z_expected}.{hint} "
                f"Received: {name}.shape={shape}"
            )


def _check_projection(feature_map, projection_matrix, key_dim):
    if feature_map.uses_random_features:
        if projection_matrix is None:
            raise ValueError(
                f"feature_map={feature_map!r} uses random features: argument "
                "`projection_matrix` of shape (num_random_features, key_dim) is required. "
                "Received: projection_matrix=None"
            )
        shape = tuple(projection_matrix.shape)
        if len(shape) != 2 or (key_dim is not None and shape[1] != key_dim):
            raise ValueError(
                f"Argument `projection_matrix` must have shape (num_random_features, {key_dim}) "
                f"to match the key dim of `query` and `key`. Received: projection_matrix.shape={shape}"
            )
    elif projection_matrix is not None:
        raise ValueError(
            f"feature_map={feature_map!r} uses no random features, so `projection_matrix` must be "
            f"None. Received: projection_matrix.shape={tuple(projection_matrix.shape)}"
        )


def _to_heads_first(x):
    return ops.transpose(x, (0, 2, 1, 3))  # (B, L, N, ·) -> (B, N, L, ·), in the dtype of x


def _with_ones_column(value):
    # (B, N, S, D) -> (B, N, S, D+1): the last column accumulates the normaliser.
    ones = ops.ones_like(value[..., :1])
    return ops.concatenate([value, ones], axis=-1)


def _features(feature_map, q, k, v, projection_matrix, causal, key_mask, low_dtype):
    """Query features, key features and value rows (with the normaliser column) for the cores.

    q, k (·, N, L, H), v (·, N, L, D), in the inputs' dtype; key_mask (·, 1, L, 1) or None.
    Returns q_feat, k_feat (·, N, L, F), v1 (·, N, L, D+1), in `low_dtype` (the fast path) or
    float32, and whether every key feature is finite.
    """
    q_feat, k_feat, k_scale = feature_map._call_factored(
        q, k, projection_matrix, causal=causal, key_mask=key_mask, low_dtype=low_dtype
    )
    v = ops.cast(v, "float32")
    if k_scale is None:
        if key_mask is not None:
            # Padded keys leave numerator and normaliser (`where`: an inf feature times 0 is NaN).
            k_feat = ops.where(key_mask > 0, k_feat, 0.0)
        return q_feat, k_feat, _with_ones_column(v), False
    # Key features are k_feat·k_scale: the per-key scale (0 for padded keys) goes into the value
    # rows and the ones column, (·, N, L, D+1), not into the (·, N, L, F) features. Factored
    # exponential features are ≤ 1 times a scale ≤ e^40 (the causal bound): never inf.
    v1 = ops.concatenate([v * k_scale, k_scale], axis=-1)
    if low_dtype is not None:
        # Features ≤ 1 and scales ≤ e^40 are in bfloat16's range (float32's exponent).
        q_feat, k_feat, v1 = (ops.cast(x, low_dtype) for x in (q_feat, k_feat, v1))
    return q_feat, k_feat, v1, True


# The backward pass of num/den divides by den twice; a normaliser below this (all of a query's
# visible keys tiny, e.g. very large key norms early in a causal sequence) would overflow it to inf.
_GRAD_DEN_FLOOR = 1e-30


def _upstream(args, upstream):
    # keras.ops.custom_gradient passes the output gradient positionally (TensorFlow) or by name.
    return args[0] if upstream is None else upstream


@ops.custom_gradient
def _divide(num, den):
    # num (..., D) / den (..., 1). The forward pass is the exact quotient. The gradient is the exact
    # one, d_num = g/den and d_den = -Σ g·out / den, except that |den| is floored at
    # _GRAD_DEN_FLOOR there: autodiff's (-num/den)/den overflows to -inf (then NaN) for a tiny but
    # representable den, which training hit with causal attention.
    out = num / den

    def grad(*args, upstream=None):
        g = _upstream(args, upstream)
        floored = ops.where(
            ops.abs(den) < _GRAD_DEN_FLOOR,
            ops.where(den < 0, -_GRAD_DEN_FLOOR, _GRAD_DEN_FLOOR),
            den,
        )
        d_num = g / floored
        d_den = -ops.sum(g * out, axis=-1, keepdims=True) / floored
        return d_num, d_den

    return out, grad


def _normalise(out):
    # (..., D+1) -> (..., D), float32. Only an all-zero feature row gives a zero normaliser (padded
    # or fully underflowed positions); their numerator is zero too, and the output is 0 instead of
    # NaN. `split`, not slices: a strided slice's gradient is slow on CPU.
    num, den = ops.split(ops.cast(out, "float32"), [out.shape[-1] - 1], axis=-1)
    return _divide(num, ops.where(ops.equal(den, 0.0), 1.0, den))


# The linear-attention cores below have hand-written gradients: the same products autodiff
# would give, each written in the orientation that is fast on CPU with and without XLA (a
# product whose output is only D+1 wide, or that needs a transposed copy of a (·, L, F) tensor,
# is the slow case). The cores are linear in each argument, so these gradients are exact.


@ops.custom_gradient
def _non_causal(q_feat, k_feat, v1):
    # q_feat (B, N, T, F), k_feat (B, N, S, F), v1 (B, N, S, D+1) -> (B, N, T, D+1)
    kv = ops.einsum("bnsd,bnsf->bndf", v1, k_feat)  # (B, N, D+1, F) = V1ᵀφ(K)
    out = ops.einsum("bntf,bndf->bntd", q_feat, kv)  # (B, N, T, D+1)

    def grad(*args, upstream=None):
        d_out = ops.cast(_upstream(args, upstream), q_feat.dtype)  # (B, N, T, D+1)
        d_kv = ops.einsum("bntd,bntf->bndf", d_out, q_feat)  # (B, N, D+1, F)
        d_q = ops.matmul(d_out, kv)  # (B, N, T, F)
        d_k = ops.matmul(v1, d_kv)  # (B, N, S, F)
        d_v1 = ops.einsum("bnsf,bndf->bnsd", k_feat, d_kv)  # (B, N, S, D+1)
        return d_q, d_k, d_v1

    return out, grad


def _chunked_core(qc, kc, vc, finite_features, log_decay=None):
    """Exact causal linear attention on chunks: qc, kc (K, B, N, C, F), vc (K, B, N, C, D+1).

    Inter-chunk term φ(Q_c)·S_c with S_c = Σ_{j<c} V1_jᵀφ(K_j), plus the intra-chunk term
    (φ(Q_c)φ(K_c)ᵀ ⊙ tril)·V1_c. Returns (K, B, N, C, D+1). With the chunk axis first, the prefix
    sums over chunks are plain 2-D matmuls over a (K, ·) view, which is faster under XLA than the
    (B, N, K, C, ·) layout and needs less memory on the longest causal runs.

    With `log_decay` (N,) = log γ per head, the state decays: S_t = γ·S_{t−1} + φ(k_t)v1_tᵀ.
    Within a chunk the mask becomes γ^(i−j) (j ≤ i); key j enters its chunk's state decayed to the
    chunk's end, γ^(C−1−j); the state S_c is the γ^C-decayed prefix of those; query i reads it
    decayed by γ^(i+1).
    """
    num_chunks, chunk_size = qc.shape[0], qc.shape[3]
    if num_chunks is None:
        num_chunks = ops.shape(qc)[0]
    causal_mask = ops.tril(ops.ones((chunk_size, chunk_size), dtype="bool"))
    if log_decay is None:
        within = q_decay = k_decay = None
    else:
        within, q_decay, k_decay = _chunk_decay_factors(log_decay, chunk_size)

    def sums(x, reverse):
        if log_decay is None:
            return _exclusive_prefix_sum(x, num_chunks, reverse=reverse)
        return _decayed_exclusive_prefix_sum(x, log_decay * chunk_size, num_chunks, reverse)

    def prefix(x, reverse):
        # Exclusive prefix (reverse: suffix) sums over chunks, as triangular matmuls. These
        # multiply later chunks by 0, which keeps them out only while they are finite. For maps
        # whose features may overflow, the finite states are summed and every state after
        # (reverse: before) a chunk holding a non-finite one is NaN, as it would be non-finite
        # after a cumsum; earlier chunks stay exact. (A cumsum is several times slower on CPU,
        # and under XLA its reduce-window grows with the number of chunks.)
        if finite_features:
            return sums(x, reverse)
        finite = ops.all(ops.isfinite(x), axis=(3, 4), keepdims=True)  # (K, B, N, 1, 1)
        total = sums(ops.where(finite, x, 0.0), reverse)
        bad = ops.cast(ops.logical_not(finite), "float32")
        poisoned = _exclusive_prefix_sum(bad, num_chunks, reverse=reverse) > 0
        return ops.where(poisoned, float("nan"), total)

    # The products run in the inputs' dtype (bfloat16 on the fast path, with float32
    # accumulation); the sums over chunks, the states, always in float32.
    dtype = qc.dtype
    if within is not None:
        within, q_decay, k_decay = (ops.cast(x, dtype) for x in (within, q_decay, k_decay))

    def summed(x, reverse):  # prefix sums of a product, in float32, back in the products' dtype
        return ops.cast(prefix(ops.cast(x, "float32"), reverse), dtype)

    def mask(x):  # (K, B, N, C, C) within-chunk weights: tril, or γ^(i−j) on and below it
        return ops.where(causal_mask, x if within is None else x * within, 0.0)

    def decayed(x, factor):  # (K, B, N, C, ·) rows times (N, C, 1), or x when there is no decay
        return x if factor is None else x * factor

    @ops.custom_gradient
    def core(qc, kc, vc):
        qd, kd = decayed(qc, q_decay), decayed(kc, k_decay)
        kv = ops.einsum("kbncd,kbncf->kbndf", vc, kd)  # (K, B, N, D+1, F): V1_cᵀφ(K_c)
        state = summed(kv, False)  # S_c, the state chunk c starts from
        scores = ops.einsum("kbncf,kbnef->kbnce", qc, kc)  # (K, B, N, C, C), within a chunk
        weights = mask(scores)
        out = ops.einsum("kbncf,kbndf->kbncd", qd, state) + ops.matmul(weights, vc)

        def grad(*args, upstream=None):
            d_out = ops.cast(_upstream(args, upstream), dtype)  # (K, B, N, C, D+1)
            d_weights = mask(ops.einsum("kbncd,kbned->kbnce", d_out, vc))
            d_state = ops.einsum("kbncd,kbncf->kbndf", d_out, qd)
            d_kv = summed(d_state, True)  # Σ over later chunks
            d_q = decayed(ops.matmul(d_out, state), q_decay) + ops.matmul(d_weights, kc)
            d_k = ops.einsum("kbnce,kbncf->kbnef", d_weights, qc) + decayed(
                ops.matmul(vc, d_kv), k_decay
            )
            d_v = ops.einsum("kbnce,kbncd->kbned", weights, d_out) + ops.einsum(
                "kbncf,kbndf->kbncd", kd, d_kv
            )
            return d_q, d_k, d_v

        return out, grad

    return core(qc, kc, vc)


def _chunk_decay_factors(log_decay, chunk_size):
    """γ^(i−j) on and below the diagonal (N, C, C), γ^(i+1) (N, C, 1) and γ^(C−1−j) (N, C, 1)."""
    idx = ops.cast(ops.arange(chunk_size), "float32")
    log_decay = ops.reshape(log_decay, (-1, 1, 1))  # (N, 1, 1)
    lag = ops.maximum(ops.expand_dims(idx, 1) - ops.expand_dims(idx, 0), 0.0)  # (C, C), i−j
    within = ops.exp(log_decay * lag)  # masked above the diagonal by the caller
    q_decay = ops.exp(log_decay * ops.reshape(idx + 1.0, (-1, 1)))
    k_decay = ops.exp(log_decay * ops.reshape(chunk_size - 1.0 - idx, (-1, 1)))
    return within, q_decay, k_decay


def _decay_matrix(size, log_rate, reverse):
    """(N, size, size): a^(k−1−j) for j < k (reverse: a^(j−1−k) for j > k), else 0; a = e^log_rate."""
    idx = ops.cast(ops.arange(size), "float32")
    rows, cols = ops.expand_dims(idx, 1), ops.expand_dims(idx, 0)
    lag = (cols - rows if reverse else rows - cols) - 1.0  # (size, size): k−1−j (j−1−k)
    powers = ops.exp(ops.reshape(log_rate, (-1, 1, 1)) * ops.maximum(lag, 0.0))
    return ops.where(lag >= 0.0, powers, 0.0)


def _decayed_exclusive_prefix_sum(x, log_rate, num_chunks, reverse=False, block=_PREFIX_BLOCK):
    """Σ_{j<k} a^(k−1−j) x[j] (reverse: Σ_{j>k} a^(j−1−k) x[j]) over axis 0 of x (K, B, N, ...),
    with a per-head rate a = e^log_rate, log_rate (N,) ≤ 0.

    The decayed counterpart of `_exclusive_prefix_sum`: per-head triangular matmuls, in blocks of
    `block` chunks when K is large or unknown (within blocks, then across the decayed block
    totals), so the cost stays linear in K.
    """
    heads = x.shape[2]
    rank = len(x.shape)
    x = ops.transpose(x, (2, 0, 1) + tuple(range(3, rank)))  # (N, K, B, ...)
    heads_first_shape = ops.shape(x)
    flat = ops.reshape(x, (heads, num_chunks, -1))  # (N, K, E)
    if isinstance(num_chunks, int) and num_chunks <= 2 * block:
        out = ops.matmul(_decay_matrix(num_chunks, log_rate, reverse), flat)
    else:
        pad = (-num_chunks) % block  # zero chunks at the end add nothing either way
        num_blocks = (num_chunks + pad) // block
        flat = ops.pad(flat, [[0, 0], [0, pad], [0, 0]])
        blocks = ops.reshape(flat, (heads, num_blocks, block, -1))  # (N, K', G, E)
        # (N, K', G, E): every block against the (N, G, G) decay matrix (an einsum, not a
        # broadcast batch matmul, which LiteRT's XNNPack delegate failed to reshape).
        within = ops.einsum("ngh,nkhe->nkge", _decay_matrix(block, log_rate, reverse), blocks)
        idx = ops.cast(ops.arange(block), "float32")
        log_rate_g = ops.reshape(log_rate, (-1, 1))  # (N, 1)
        # Each block's total decayed to its end (reverse: its start), then carried across
        # blocks at rate a^G, then into each chunk: a^r after the block start (reverse: a^(G−1−r)
        # before its end).
        to_edge = ops.exp(log_rate_g * (idx if reverse else block - 1.0 - idx))  # (N, G)
        from_edge = ops.exp(log_rate_g * ((block - 1.0 - idx) if reverse else idx))  # (N, G)
        totals = ops.sum(blocks * ops.reshape(to_edge, (heads, 1, block, 1)), axis=2)  # (N, K', E)
        across = ops.matmul(_decay_matrix(num_blocks, log_rate * block, reverse), totals)
        carried = ops.expand_dims(across, 2) * ops.expand_dims(ops.expand_dims(from_edge, 1), 3)
        out = ops.reshape(within + carried, (heads, num_blocks * block, -1))[:, :num_chunks]
    out = ops.reshape(out, heads_first_shape)
    return ops.transpose(out, (1, 2, 0) + tuple(range(3, rank)))  # back to (K, B, N, ...)


def _exclusive_prefix_sum(x, num_chunks, reverse=False, block=_PREFIX_BLOCK):
    """Σ_{j<k} x[j] (reverse: Σ_{j>k}) for every k, over axis 0 of x (K, ...).

    A cumsum op is slow on CPU (several times a matmul of the same size, under XLA too) and a
    scan would loop over K, so sums come from strictly triangular matmuls: one K×K product when
    K is small and static; otherwise blocks of `block` chunks (a block×block product within
    blocks and a (K/block)² one across block totals), which keeps the cost linear in K.
    """
    shape = ops.shape(x)
    flat = ops.reshape(x, (num_chunks, -1))  # (K, E)
    if isinstance(num_chunks, int) and num_chunks <= 2 * block:
        out = ops.matmul(_strictly_triangular(num_chunks, reverse), flat)
    else:
        pad = (-num_chunks) % block  # zero chunks at the end add nothing either way
        num_blocks = (num_chunks + pad) // block
        flat = ops.pad(flat, [[0, pad], [0, 0]])
        blocks = ops.reshape(flat, (num_blocks, block, -1))  # (K', G, E)
        within = ops.matmul(_strictly_triangular(block, reverse), blocks)
        across = ops.matmul(_strictly_triangular(num_blocks, reverse), ops.sum(blocks, axis=1))
        out = ops.reshape(within + ops.expand_dims(across, 1), (num_blocks * block, -1))
        out = out[:num_chunks]
    return ops.reshape(out, shape)


def _chunk_geometry(length, chunk_size):
    # (chunk_size, num_chunks, pad); length and the results may be traced (unknown length).
    if isinstance(length, int):
        chunk_size = max(1, min(chunk_size, length))  # short inputs: one chunk, no padding
        num_chunks = -(-length // chunk_size)
    else:
        num_chunks = (length + chunk_size - 1) // chunk_size
    return chunk_size, num_chunks, num_chunks * chunk_size - length


def _to_chunks_first(x, chunk_size, num_chunks, pad):
    """(B, L, N, W) -> (K·B, N, C, W): chunk k of batch row b at row k·B + b, heads before C."""
    if not (isinstance(pad, int) and pad == 0):
        x = ops.pad(x, [[0, 0], [0, pad], [0, 0], [0, 0]])  # after every real position
    batch, heads, width = ops.shape(x)[0], x.shape[2], x.shape[3]
    x = ops.reshape(x, (batch, num_chunks, chunk_size, heads, width))
    x = ops.transpose(x, (1, 0, 3, 2, 4))  # (K, B, N, C, W)
    return ops.reshape(x, (num_chunks * batch, heads, chunk_size, width))


def _from_chunks_first(x, batch, num_chunks, length, pad):
    """(K, B, N, C, W) -> (B, L, N, W)."""
    chunk_size, heads, width = x.shape[3], x.shape[2], x.shape[4]
    x = ops.transpose(x, (1, 0, 3, 2, 4))  # (B, K, C, N, W)
    x = ops.reshape(x, (batch, num_chunks * chunk_size, heads, width))
    return x if isinstance(pad, int) and pad == 0 else x[:, :length]


def _strictly_triangular(size, upper):
    # (size, size) float32, ones strictly below (upper: above) the diagonal; size may be traced.
    idx = ops.arange(size)
    rows, cols = ops.expand_dims(idx, 1), ops.expand_dims(idx, 0)
    return ops.cast(ops.less(rows, cols) if upper else ops.greater(rows, cols), "float32")


def _validate_qkv(query, key, value):
    _static_rank_check(query, 4, "query", "(batch, query_length, num_heads, key_dim)")
    _static_rank_check(key, 4, "key", "(batch, key_length, num_heads, key_dim)")
    _static_rank_check(value, 4, "value", "(batch, key_length, num_heads, value_dim)")
    qs, ks, vs = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    _check_dim(
        qs[-1],
        ks[-1],
        f"The key dim of `query` and `key` must match. Received: query.shape={qs}, key.shape={ks}",
    )
    _check_dim(
        ks[1],
        vs[1],
        f"`key` and `value` must have the same length. Received: key.shape={ks}, value.shape={vs}",
    )
    for name, shape in (("key", ks), ("value", vs)):
        _check_dim(
            qs[0],
            shape[0],
            f"`query` and `{name}` must have the same batch size. "
            f"Received: query.shape={qs}, {name}.shape={shape}",
        )
        _check_dim(
            qs[2],
            shape[2],
            f"`query` and `{name}` must have the same number of heads. "
            f"Received: query.shape={qs}, {name}.shape={shape}",
        )


def favor_attention(
    query,
    key,
    value,
    feature_map="softmax_positive",
    projection_matrix=None,
    *,
    causal=False,
    key_padding_mask=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    decay=None,
    matmul_dtype=None,
    local_window=None,
):
    """Random-feature attention D⁻¹ φ(Q) (φ(K)ᵀ V), in time and memory linear in length.

    Args:
        query: (B, T, N, H).
        key: (B, S, N, H).
        value: (B, S, N, D).
        feature_map: a name, config dict or `FeatureMap` (see `keras_favor.feature_maps`).
        projection_matrix: (M, H) random features ω for maps that use them, else None.
        causal: position t attends to keys 0..t only (requires T == S). Computed exactly by
            chunks: within a chunk, a masked C×C product; across chunks, an exclusive prefix sum of
            the per-chunk states φ(K_c)ᵀV_c. Time O(L·C·F + L·F·D), memory O((L/C)·F·D).
        key_padding_mask: (B, S), True (or 1) for real keys. Padded keys are removed from the
            numerator and the normaliser, so padding equals truncation.
        chunk_size: C for causal attention, a positive int (lengths need not be multiples of it).
        decay: causal attention only: a per-head decay γ of the causal state (RetNet-style),
            S_t = γ·S_(t−1) + φ(k_t)v_tᵀ and z_t = γ·z_(t−1) + φ(k_t), so key j weighs γ^(t−j) in
            query t's numerator and normaliser. None (no decay), `"retnet"` (`decay_rates(N)`),
            one number in (0, 1] or a list of N of them. Exact in the chunked form, same cost.
            With `causal=False` it raises a ValueError.
        local_window: None (default) or a positive int w: exact softmax weights over the keys
            with |t − s| < w (causal: 0 ≤ t − s < w), the map's kernel calibrated on them over
            the others (see `FavorAttention`'s `local_window`). Needs T == S; computed in
            float32 (`matmul_dtype` applies only without it).
        matmul_dtype: the dtype of the products. None (default): `"bfloat16"` when `query` is
            bfloat16 (a `mixed_bfloat16` policy) and the map has the fast path, else
            `"float32"`. The fast path, for the exponential maps (`softmax_positive`,
            `softmax_hyperbolic`, `softmax_optimal`): the feature logits ωᵀx and the products
            φ(K)ᵀV, φ(Q)·(φ(K)ᵀV) and the within-chunk ones take bfloat16 inputs (float32
            accumulation); the stabilisers, `exp`, the sums over keys and chunks (the causal
            state) and the normaliser stay in float32. Its error is bfloat16 rounding, far below
            the estimator's own (`benchmarks/approximation.py --matmul-dtype` measures both).
            Every other map, and float16 inputs (whose range cannot hold the causal key scales,
            up to e^40), computes in float32. `"float32"` forces float32 throughout;
            `"bfloat16"` forces the fast path for float32 inputs too.

    Returns:
        (B, T, N, D) in the dtype of `query`.

    Example:

    >>> import numpy as np
    >>> from keras_favor.ops import random_features_matrix
    >>> q = k = v = np.random.randn(2, 10, 4, 16).astype("float32")
    >>> w = random_features_matrix(64, 16, seed=1)
    >>> tuple(favor_attention(q, k, v, "softmax_positive", w, causal=True).shape)
    (2, 10, 4, 16)

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794.
    """
    feature_map = feature_maps_lib.get(feature_map)
    positive_int(chunk_size, "chunk_size")
    boolean(causal, "causal")
    _validate_qkv(query, key, value)
    qs, ks = tuple(query.shape), tuple(key.shape)
    if causal:
        _check_dim(
            qs[1],
            ks[1],
            "Argument `causal=True` needs queries and keys of the same length. "
            f"Received: causal=True, query.shape={qs}, key.shape={ks}",
        )
    _check_projection(feature_map, projection_matrix, qs[-1])
    log_decay = _log_decay(decay, qs[2], causal)
    low_dtype = _low_dtype(feature_map, matmul_dtype, query.dtype)
    _check_local_window(local_window, qs, ks)
    mask = None
    if key_padding_mask is not None:
        check_padding_mask(key_padding_mask, "key_padding_mask", qs[0], ks[1])
        mask = ops.cast(key_padding_mask, "float32")  # (B, S)

    if not causal and local_window is None:
        # expand_dims, not [:, None, :, None]: a strided slice adding axes has no TFLite builtin.
        key_mask = None if mask is None else ops.expand_dims(mask, (1, 3))  # (B, 1, S, 1)
        q, k, v = _to_heads_first(query), _to_heads_first(key), _to_heads_first(value)
        q_feat, k_feat, v1, _ = _features(
            feature_map, q, k, v, projection_matrix, False, key_mask, low_dtype
        )
        out = _non_causal(q_feat, k_feat, v1)  # (B, N, T, D+1)
        out = ops.transpose(_normalise(out), (0, 2, 1, 3))  # (B, T, N, D)
        return ops.cast(out, query.dtype)

    if local_window is not None:
        out = _hybrid(
            query,
            key,
            value,
            feature_map,
            projection_matrix,
            causal,
            mask,
            local_window,
            chunk_size,
            log_decay,
        )
        return ops.cast(out, query.dtype)
    out = _causal_unnormalised(
        query, key, value, feature_map, projection_matrix, mask, chunk_size, log_decay, low_dtype
    )
    return ops.cast(_normalise(out), query.dtype)


def _causal_unnormalised(
    query, key, value, feature_map, projection_matrix, mask, chunk_size, log_decay, low_dtype
):
    """Causal linear attention's numerator and normaliser, (B, T, N, D+1) float32; mask (B, S)."""
    length = query.shape[1] if query.shape[1] is not None else ops.shape(query)[1]
    chunk_size, num_chunks, pad = _chunk_geometry(length, chunk_size)
    batch = ops.shape(query)[0]

    def chunks(x):  # (B, L, N, ·) -> (K·B, N, C, ·); positions past the end are zeros
        return _to_chunks_first(x, chunk_size, num_chunks, pad)

    # Features are per position in causal mode, so they are computed on chunks as rows.
    key_mask = None if mask is None else chunks(ops.expand_dims(mask, (2, 3)))  # (K·B, 1, C, 1)
    q_feat, k_feat, v1, finite = _features(
        feature_map,
        chunks(query),
        chunks(key),
        chunks(value),
        projection_matrix,
        True,
        key_mask,
        low_dtype,
    )

    return _causal_core(q_feat, k_feat, v1, finite, log_decay, (batch, num_chunks, length, pad))


def _causal_core(q_feat, k_feat, v1, finite, log_decay, geometry):
    """`_chunked_core` on (K·B, N, C, ·) rows: (B, T, N, D+1) float32. `geometry` is
    (batch, num_chunks, length, pad)."""
    batch, num_chunks, length, pad = geometry

    def split(x):  # (K·B, N, C, ·) -> (K, B, N, C, ·)
        return ops.reshape(x, (num_chunks, batch, x.shape[1], x.shape[2], x.shape[-1]))

    out = _chunked_core(split(q_feat), split(k_feat), split(v1), finite, log_decay)
    return _from_chunks_first(ops.cast(out, "float32"), batch, num_chunks, length, pad)


def check_local_window(local_window):
    """Checks `local_window`: None or a positive int."""
    if local_window is not None:
        positive_int(local_window, "local_window")


def _check_local_window(local_window, query_shape, key_shape):
    if local_window is None:
        return
    check_local_window(local_window)
    _check_dim(
        query_shape[1],
        key_shape[1],
        "Argument `local_window` needs queries and keys of the same length (query t and key s "
        f"are neighbours when |t − s| < local_window). Received: local_window={local_window}, "
        f"query.shape={query_shape}, key.shape={key_shape}",
    )


def _causal_from_features(q_feat, k_feat, v1, finite, chunk_size, log_decay):
    """Causal linear attention of (B, L, N, ·) features and value rows: (B, L, N, D+1) float32."""
    length = q_feat.shape[1] if q_feat.shape[1] is not None else ops.shape(q_feat)[1]
    chunk_size, num_chunks, pad = _chunk_geometry(length, chunk_size)
    geometry = (ops.shape(q_feat)[0], num_chunks, length, pad)
    q_feat, k_feat, v1 = (
        _to_chunks_first(x, chunk_size, num_chunks, pad) for x in (q_feat, k_feat, v1)
    )
    return _causal_core(q_feat, k_feat, v1, finite, log_decay, geometry)


def _hybrid(
    query, key, value, feature_map, projection_matrix, causal, mask, window, chunk_size, log_decay
):
    """Exact softmax over the keys with |t − s| < window, the map's kernel over the others.

    The kernel's weights are calibrated per query on the window: scaled by
    α_t = Σ_window exp(s_ts − c_t) / Σ_window φ(q_t)·φ(k_s), so the map decides how the
    attention splits between the window and the rest, and exact softmax decides it within the
    window. Every per-query or per-sequence factor of the kernel (stabilisers, normalisers)
    cancels in α_t, so any map can be mixed with exact weights. Returns (B, T, N, D) float32.

    The kernel's part is linear attention over every key minus its terms on the window's keys
    (computed with the window, from the same features). For positive maps the subtraction costs
    float32 rounding of the kernel's total only: scaled by α_t that is rounding of the window's
    exact mass, which the normaliser contains.
    """
    key_mask = None if mask is None else ops.expand_dims(mask, (1, 3))  # (B, 1, S, 1)
    q, k, v = _to_heads_first(query), _to_heads_first(key), _to_heads_first(value)
    q_feat, k_feat, v1, finite = _features(
        feature_map, q, k, v, projection_matrix, causal, key_mask, None
    )  # (B, N, L, ·); padded keys have zero features
    if causal:
        every = _causal_from_features(
            *(_to_heads_first(x) for x in (q_feat, k_feat, v1)), finite, chunk_size, log_decay
        )  # (B, T, N, D+1)
        every = _to_heads_first(every)
    else:
        every = _non_causal(q_feat, k_feat, v1)  # (B, N, T, D+1)
    near, kernel_near, alpha = _local_softmax(
        q, k, v, mask, q_feat, k_feat, v1, window, causal, log_decay
    )
    out = near + alpha * (ops.cast(every, "float32") - kernel_near)  # (B, N, T, D+1)
    return _to_heads_first(_normalise(out))


def _local_softmax(q, k, v, mask, q_feat, k_feat, v1, window, causal, log_decay):
    """The window's exact part, the kernel's part on the window and its calibration.

    q, k (B, N, L, H), v (B, N, L, D), q_feat, k_feat (B, N, L, F) and v1 (B, N, L, D+1) as the
    linear part has them (v1's last column: each key's scale, 1 without one); `mask` (B, S)
    float32 or None. Returns, (B, N, T, ·) float32: Σ_s exp(q_t·k_s/√H − c_t)·γ^(t−s)·[v_s, 1]
    over keys with |t − s| < window (causal: 0 <= t − s), c_t the largest of those scores,
    (B, N, T, D+1); the same sum with the kernel's weights φ(q_t)·φ(k_s) on the value rows v1;
    and α_t (B, N, T, 1), the window's exact mass over its kernel mass (0 when the latter is 0).
    Blocks of `window` queries see the previous, their own and (bidirectional) the next block of
    keys: O(L·window) time and memory, as batched matmuls.
    """
    batch, heads = ops.shape(q)[0], q.shape[1]
    length = q.shape[2] if q.shape[2] is not None else ops.shape(q)[2]
    num_blocks = (length + window - 1) // window
    pad = num_blocks * window - length

    def blocks(x):  # (B, N', L, W) -> (B, N', K, C, W), zeros past the end
        x = ops.pad(ops.cast(x, "float32"), [[0, 0], [0, 0], [0, pad], [0, 0]])
        return ops.reshape(x, (batch, x.shape[1], num_blocks, window, x.shape[-1]))

    def neighbours(x):  # (B, N', K, C, ·) -> (B, N', K, J, ·): previous, own (and next) block
        zeros = ops.zeros_like(x[:, :, :1])
        parts = [ops.concatenate([zeros, x[:, :, :-1]], axis=2), x]
        if not causal:
            parts.append(ops.concatenate([x[:, :, 1:], zeros], axis=2))
        return ops.concatenate(parts, axis=3)

    def keys_of(x):  # (B, N', L, W) -> (B, N', K, W, J): the neighbours, transposed for matmul
        return ops.swapaxes(neighbours(blocks(x)), -1, -2)

    if mask is None:
        mask = ops.ones((batch, length), dtype="float32")
    real = keys_of(ops.expand_dims(mask, (1, 3)))  # (B, 1, K, 1, J): 0 for padded keys, the end
    width = 2 * window if causal else 3 * window
    lag = np.arange(window)[:, None] + window - np.arange(width)[None, :]  # t − s, (C, J)
    band = (lag >= 0) if causal else (lag > -window)
    keep = ops.logical_and(band & (lag < window), real > 0)  # (B, 1, K, C, J)

    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = ops.matmul(blocks(q) * scale, keys_of(k))  # (B, N, K, C, J)
    top = ops.max(ops.where(keep, scores, -np.inf), axis=-1, keepdims=True)
    top = ops.where(ops.isfinite(top), top, 0.0)  # a query with no key in its window
    exact = ops.where(keep, ops.exp(ops.where(keep, scores, top) - top), 0.0)
    kernel = ops.where(keep, ops.matmul(blocks(q_feat), keys_of(k_feat)), 0.0)
    v1 = neighbours(blocks(v1))  # (B, N, K, J, D+1)
    key_scale = ops.swapaxes(v1[..., -1:], -1, -2)  # (B, N, K, 1, J)
    alpha = _calibration(
        ops.sum(exact, axis=-1, keepdims=True), ops.sum(kernel * key_scale, -1, keepdims=True)
    )  # (B, N, K, C, 1)
    if log_decay is not None:
        decay = ops.exp(ops.reshape(log_decay, (-1, 1, 1, 1)) * lag.astype("float32"))
        exact, kernel = exact * decay, kernel * decay
    value_rows = neighbours(blocks(_with_ones_column(v)))  # (B, N, K, J, D+1)
    value_rows = value_rows * ops.swapaxes(real, -1, -2)  # padded keys' rows 0, ones column too
    near = ops.matmul(exact, value_rows)  # (B, N, K, C, D+1)
    kernel_near = ops.matmul(kernel, v1)

    def rows(x):  # (B, N, K, C, W) -> (B, N, T, W)
        x = ops.reshape(x, (batch, heads, num_blocks * window, x.shape[-1]))
        return x if isinstance(pad, int) and pad == 0 else x[:, :, :length]

    return rows(near), rows(kernel_near), rows(alpha)


def _calibration(exact_mass, kernel_mass):
    """α = exact_mass / kernel_mass, the kernel's scale on a window; 0 where the kernel has no
    mass there (the window's exact weights then stand alone)."""
    positive = kernel_mass > 0
    return ops.where(positive, exact_mass / ops.where(positive, kernel_mass, 1.0), 0.0)


def favor_initial_state(
    batch_size,
    num_heads,
    key_dim,
    value_dim,
    feature_map,
    num_random_features=None,
    local_window=None,
):
    """The empty decoding state (S, z): S (B, N, F, D) = Σ φ(k)vᵀ and z (B, N, F) = Σ φ(k).

    F is `feature_map.output_dim(key_dim, num_random_features)`. The state's size is fixed: it does
    not grow with the number of decoded positions. With `local_window=w` it is (S, z, K, V1): S
    and z sum the keys that left the window, K (B, N, w, H) holds the last w keys and
    V1 (B, N, w, D + 1) their values with a last column of 1 for each key seen (0: empty slot).
    """
    check_local_window(local_window)
    feature_map = feature_maps_lib.get(feature_map)
    if feature_map.uses_random_features and num_random_features is None:
        raise ValueError(
            f"feature_map={feature_map!r} uses random features: pass `num_random_features`. "
            "Received: num_random_features=None"
        )
    if num_random_features is not None:
        positive_int(num_random_features, "num_random_features")
    feat_dim = feature_map.output_dim(key_dim, num_random_features)
    state = (
        ops.zeros((batch_size, num_heads, feat_dim, value_dim), dtype="float32"),
        ops.zeros((batch_size, num_heads, feat_dim), dtype="float32"),
    )
    if local_window is None:
        return state
    return state + (
        ops.zeros((batch_size, num_heads, local_window, key_dim), dtype="float32"),
        ops.zeros((batch_size, num_heads, local_window, value_dim + 1), dtype="float32"),
    )


def favor_attention_step(
    query,
    key,
    value,
    state,
    feature_map="softmax_positive",
    projection_matrix=None,
    decay=None,
    local_window=None,
):
    """One causal decoding step with a fixed-size state.

    Adds the new key and value to the state, then attends from the new query. Equal, position by
    position, to `favor_attention(..., causal=True)` on the whole sequence.

    Args:
        query: (B, N, H), the new position's query.
        key: (B, N, H).
        value: (B, N, D).
        state: (S, z) with S (B, N, F, D) and z (B, N, F), from `favor_initial_state` or a
            previous step; with `local_window`, (S, z, K, V1) (see `favor_initial_state`).
        feature_map: as in `favor_attention`.
        projection_matrix: as in `favor_attention`.
        decay: as in `favor_attention`: the state decays by γ per head before the new key enters.
        local_window: as in `favor_attention`: the last `local_window` keys (the new one
            included) are attended exactly; a key enters S and z when it leaves the window.

    Returns:
        (output (B, N, D) in the dtype of `query`, new state).
    """
    feature_map = feature_maps_lib.get(feature_map)
    _static_rank_check(query, 3, "query", "(batch, num_heads, key_dim)")
    _static_rank_check(key, 3, "key", "(batch, num_heads, key_dim)")
    _static_rank_check(value, 3, "value", "(batch, num_heads, value_dim)")
    check_local_window(local_window)
    size = 2 if local_window is None else 4
    if not isinstance(state, (tuple, list)) or len(state) != size:
        raise ValueError(
            f"Argument `state` must be the {size} arrays from `favor_initial_state`"
            + ("" if local_window is None else f" with local_window={local_window}")
            + f". Received: state={type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
        )
    _check_dim(
        query.shape[-1],
        key.shape[-1],
        f"The key dim of `query` and `key` must match. Received: query.shape={tuple(query.shape)}, "
        f"key.shape={tuple(key.shape)}",
    )
    _check_projection(feature_map, projection_matrix, query.shape[-1])
    log_decay = _log_decay(decay, query.shape[1], True)
    if local_window is not None:
        return _windowed_step(
            query, key, value, state, feature_map, projection_matrix, log_decay, local_window
        )
    s_state, z_state = state
    q = ops.cast(query, "float32")[:, :, None, :]  # (B, N, 1, H)
    k = ops.cast(key, "float32")[:, :, None, :]
    v = ops.cast(value, "float32")
    q_feat, k_feat = feature_map(q, k, projection_matrix, causal=True)  # (B, N, 1, F)
    _check_state(
        s_state, z_state, (*query.shape[:2], k_feat.shape[-1], value.shape[-1]), feature_map
    )
    k_col = ops.transpose(k_feat, (0, 1, 3, 2))  # (B, N, F, 1)
    if log_decay is not None:
        rate = ops.exp(log_decay)  # (N,), as the chunked form computes γ^1
        s_state = s_state * ops.reshape(rate, (-1, 1, 1))
        z_state = z_state * ops.reshape(rate, (-1, 1))
    s_state = s_state + k_col * ops.expand_dims(v, 2)  # (B, N, F, D)
    z_state = z_state + k_feat[:, :, 0]  # (B, N, F)
    num = ops.matmul(q_feat, s_state)[:, :, 0]  # (B, N, D)
    den = ops.matmul(q_feat, ops.expand_dims(z_state, -1))[:, :, 0]  # (B, N, 1)
    out = num / ops.where(ops.equal(den, 0.0), 1.0, den)
    return ops.cast(out, query.dtype), (s_state, z_state)


def _windowed_step(query, key, value, state, feature_map, projection_matrix, log_decay, window):
    """`favor_attention_step` with a local window: the state is (S, z, K, V1)."""
    s_state, z_state, keys, values = state
    expected = {
        "K": (keys, (*query.shape[:2], window, query.shape[-1])),
        "V1": (values, (*query.shape[:2], window, value.shape[-1] + 1)),
    }
    for name, (x, shape) in expected.items():
        if any(a is not None and b is not None and a != b for a, b in zip(x.shape, shape)):
            raise ValueError(
                f"The window state {name} must have shape {shape} (local_window={window}). "
                f"Received: {name}.shape={tuple(x.shape)}"
            )
    q = ops.cast(query, "float32")[:, :, None, :]  # (B, N, 1, H)
    k = ops.cast(key, "float32")[:, :, None, :]
    v1 = _with_ones_column(ops.cast(value, "float32")[:, :, None, :])  # (B, N, 1, D+1)
    keys = ops.concatenate([keys, k], axis=2)  # positions t − window .. t
    values = ops.concatenate([values, v1], axis=2)
    q_feat, k_feat = feature_map(q, keys, projection_matrix, causal=True)  # (B, N, w+1, F)
    _check_state(
        s_state, z_state, (*query.shape[:2], k_feat.shape[-1], value.shape[-1]), feature_map
    )
    # The oldest key (t − window) leaves the window and enters the state, weighted γ^window.
    seen = values[:, :, :, -1:]  # (B, N, w+1, 1): 1 for keys seen, 0 for empty slots
    leaving = ops.transpose(k_feat[:, :, :1] * seen[:, :, :1], (0, 1, 3, 2))  # (B, N, F, 1)
    entering_s, entering_z = leaving * values[:, :, :1, :-1], leaving[..., 0]
    if log_decay is not None:
        rate = ops.exp(log_decay)
        s_state = s_state * ops.reshape(rate, (-1, 1, 1))
        z_state = z_state * ops.reshape(rate, (-1, 1))
        entering_s = entering_s * ops.reshape(ops.exp(log_decay * window), (-1, 1, 1))
        entering_z = entering_z * ops.reshape(ops.exp(log_decay * window), (-1, 1))
    s_state, z_state = s_state + entering_s, z_state + entering_z
    keys, values, k_feat, seen = keys[:, :, 1:], values[:, :, 1:], k_feat[:, :, 1:], seen[:, :, 1:]
    seen = seen[..., 0] > 0  # (B, N, w)
    scores = ops.einsum("bnh,bnjh->bnj", q[:, :, 0], keys) * (1.0 / math.sqrt(keys.shape[-1]))
    top = ops.max(ops.where(seen, scores, -np.inf), axis=-1, keepdims=True)  # the new key is seen
    exact = ops.where(seen, ops.exp(scores - top), 0.0)
    kernel = ops.where(seen, ops.einsum("bnf,bnjf->bnj", q_feat[:, :, 0], k_feat), 0.0)
    alpha = _calibration(
        ops.sum(exact, axis=-1, keepdims=True), ops.sum(kernel, axis=-1, keepdims=True)
    )  # (B, N, 1)
    if log_decay is not None:
        lag = np.arange(window - 1, -1, -1).astype("float32")  # t − s of each slot
        exact = exact * ops.exp(ops.reshape(log_decay, (-1, 1)) * lag)
    near = ops.einsum("bnj,bnjd->bnd", exact, values)  # (B, N, D+1)
    far_num = ops.matmul(q_feat, s_state)[:, :, 0]  # (B, N, D)
    far_den = ops.matmul(q_feat, ops.expand_dims(z_state, -1))[:, :, 0]  # (B, N, 1)
    out = _normalise(near + alpha * ops.concatenate([far_num, far_den], axis=-1))
    return ops.cast(out, query.dtype), (s_state, z_state, keys, values)
