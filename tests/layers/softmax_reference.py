"""A float64 numpy forward of the blocks with exact softmax attention, read from their weights.

Independent of `keras.layers.MultiHeadAttention`: the reference that `attention_type="softmax"`
blocks are checked against (projections, masked softmax, optional RoPE on the projected queries
and keys, residuals, layer norms, feed-forward network).
"""

import math

import numpy as np

from tests.testing import to_numpy


def _weights(layer):
    return {
        w.path.split("/")[-2] + "/" + w.name: to_numpy(w).astype("float64") for w in layer.weights
    }


def rotate(x, max_wavelength):
    """RoPE of (B, L, N, H) at positions 0..L-1, "rotate half" layout."""
    length, width = x.shape[1], x.shape[-1]
    half = width // 2
    inverse_freq = float(max_wavelength) ** (-np.arange(half) * (2.0 / width))  # (H/2,)
    angles = np.arange(length)[:, None] * inverse_freq  # (L, H/2)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(layer, query, value, key_mask=None, causal=False, rotary_max_wavelength=None):
    """softmax(Q Kᵀ / √H) V through the layer's projections. query (B, T, E), value (B, S, E)."""
    w = _weights(layer)
    query, value = np.asarray(query, "float64"), np.asarray(value, "float64")
    q = np.einsum("btE,ENH->btNH", query, w["query/kernel"]) + w["query/bias"]
    k = np.einsum("bsE,ENH->bsNH", value, w["key/kernel"]) + w["key/bias"]
    v = np.einsum("bsE,ENH->bsNH", value, w["value/kernel"]) + w["value/bias"]
    if rotary_max_wavelength is not None:
        q, k = rotate(q, rotary_max_wavelength), rotate(k, rotary_max_wavelength)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])  # (B, N, T, S)
    allowed = np.ones(scores.shape, bool)
    if key_mask is not None:
        allowed &= np.asarray(key_mask, bool)[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones(scores.shape[-2:], bool))
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bnts,bsnd->btnd", probs, v)
    return (
        np.einsum("btnd,ndE->btE", heads, w["attention_output/kernel"]) + w["attention_output/bias"]
    )


def layer_norm(layer, x):
    w = _weights(layer)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + layer.epsilon) * w[f"{layer.name}/gamma"] + w[
        f"{layer.name}/beta"
    ]


def _activation(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":  # exact (erf) GELU
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    raise NotImplementedError(name)


def _residual(block, x, sublayer, norm):
    if block.normalize_first:
        return x + sublayer(layer_norm(norm, x))
    return layer_norm(norm, x + sublayer(x))


def _feedforward(block, x):
    inner = _weights(block._feedforward_intermediate_dense)
    outer = _weights(block._feedforward_output_dense)
    activation = block.activation.__name__

    def mlp(h):
        hidden = _activation(
            activation,
            h @ inner["feedforward_intermediate_dense/kernel"]
            + inner["feedforward_intermediate_dense/bias"],
        )
        return (
            hidden @ outer["feedforward_output_dense/kernel"]
            + outer["feedforward_output_dense/bias"]
        )

    return _residual(block, x, mlp, block._feedforward_layer_norm)


def encoder_block(block, x, padding_mask=None):
    """`FavorTransformerEncoder(attention_type="softmax")` in float64 numpy."""
    wavelength = block.rotary_max_wavelength if block.use_rotary_embedding else None
    x = np.asarray(x, "float64")

    def attend(h):
        return attention(block._self_attention_layer, h, h, padding_mask, False, wavelength)

    x = _residual(block, x, attend, block._self_attention_layer_norm)
    return _feedforward(block, x)


def decoder_block(block, x, encoder_sequence=None, decoder_mask=None, encoder_mask=None):
    """`FavorTransformerDecoder(attention_type="softmax")` in float64 numpy."""
    wavelength = block.rotary_max_wavelength if block.use_rotary_embedding else None
    x = np.asarray(x, "float64")

    def attend(h):
        return attention(block._self_attention_layer, h, h, decoder_mask, True, wavelength)

    x = _residual(block, x, attend, block._self_attention_layer_norm)
    if encoder_sequence is not None:

        def cross(h):
            return attention(block._cross_attention_layer, h, encoder_sequence, encoder_mask)

        x = _residual(block, x, cross, block._cross_attention_layer_norm)
    return _feedforward(block, x)
