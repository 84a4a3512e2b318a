"""Exact-softmax baselines for the examples: the blocks FAVOR models are compared against."""

import keras


def exact_block(x, intermediate_dim, num_heads, seed, name, causal=False):
    """A pre-LN Transformer block with exact softmax attention (`MultiHeadAttention`).

    x + MHA(LN(x)), then x + Dense(GELU(Dense(LN(x)))): the same layers, shapes and initializers
    as `FavorTransformerDecoder` / `FavorTransformerEncoder` with `normalize_first=True` and
    `activation="gelu"`, whose `FavorAttention` has `MultiHeadAttention`'s projections. A padding
    mask travels as the Keras mask of `x`, which `MultiHeadAttention` honours for queries and keys.

    Args:
        x: (batch, length, width) functional-API tensor.
        intermediate_dim: width of the feed-forward layer.
        num_heads: attention heads (the key dim is width // num_heads).
        seed: seeds the attention and the two feed-forward initializers (seed, seed+1, seed+2).
        name: prefix of the layer names.
        causal: causal self-attention (a decoder block) or not (an encoder block).

    Returns:
        The block's output, shaped like `x`.
    """
    width = x.shape[-1]
    h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{name}_attention_norm")(x)
    h = keras.layers.MultiHeadAttention(
        num_heads,
        width // num_heads,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name=f"{name}_attention",
    )(h, h, use_causal_mask=causal)
    x = keras.layers.Add(name=f"{name}_attention_residual")([x, h])
    h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{name}_feedforward_norm")(x)
    h = keras.layers.Dense(
        intermediate_dim,
        activation="gelu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
        name=f"{name}_feedforward_intermediate",
    )(h)
    h = keras.layers.Dense(
        width,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
        name=f"{name}_feedforward_output",
    )(h)
    return keras.layers.Add(name=f"{name}_feedforward_residual")([x, h])
