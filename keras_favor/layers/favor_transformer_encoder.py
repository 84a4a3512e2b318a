"""FavorTransformerEncoder: a Transformer encoder block with FAVOR attention."""

import keras

from keras_favor.layers._favor_block import FavorBlockBase
from keras_favor.layers._masks import merged_padding_mask


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorTransformerEncoder(FavorBlockBase):
    """A Transformer encoder block whose self-attention is `FavorAttention` (linear in length).

    Self-attention and a feed-forward network, each with a residual connection, dropout and a
    layer norm (after the residual by default, before the sub-layer with `normalize_first=True`),
    as keras-hub's `TransformerEncoder`, with the same argument names. The attention is FAVOR
    (bidirectional); every `FavorAttention` option is passed through, and rotary position
    embeddings can be applied to the projected queries and keys before the feature map.

    Args:
        intermediate_dim: the hidden size of the feed-forward network, a positive integer.
        num_heads: the number of attention heads; it must divide the input width E. Each head
            has size E // num_heads.
        dropout: the dropout rate of the attention output (see `FavorAttention`), and of the
            attention and feed-forward residual branches. Defaults to 0.
        activation: the activation of the feed-forward network. Defaults to `"relu"`.
        layer_norm_epsilon: the epsilon of the layer norms. Defaults to 1e-5.
        kernel_initializer: initializer of the dense kernels. Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of the dense biases. Defaults to `"zeros"`.
        normalize_first: pre-LN (True) or post-LN (False, default) residual blocks.
        feature_map: the FAVOR feature map φ (see `FavorAttention`). Defaults to
            `"softmax_positive"`.
        num_random_features: M, the number of random features. Defaults to 256.
        row_norms: `"chi"` (default) or `"sqrt_dim"`.
        orthogonal: draw orthogonal random features. Defaults to True.
        causal_chunk_size: passed to `FavorAttention` (unused by the bidirectional encoder).
            Defaults to 128.
        use_rotary_embedding: apply rotary position embeddings (RoPE) to the projected queries
            and keys, before the feature map. Defaults to False.
        rotary_max_wavelength: the base of the RoPE frequencies. Defaults to 10000.
        seed: None or a non-negative int. An int makes the random features and dropout masks
            reproducible; every sub-layer gets its own seed derived from it.
        attention_type: `"favor"` (default): `FavorAttention`, linear in length. `"softmax"`:
            exact `keras.layers.MultiHeadAttention` (quadratic in length), with the same
            sub-layers and weights, so a softmax block's weights load into a FAVOR block (and a
            pretrained BERT-style model converts to one); the FAVOR options are then unused and
            `dropout` drops attention probabilities, as in `MultiHeadAttention`.
        local_window: None (default) or a positive int w: the self-attention is exact softmax
            over neighbours (|t − s| < w) and the feature map beyond them (see
            `FavorAttention`); needs `attention_type="favor"`.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: (B, T, E) sequence.
        padding_mask: optional (B, T) mask, True (or 1) for real tokens. Padded tokens are
            removed from attention (padding equals truncation). Combined with the Keras mask of
            `inputs` if it has one (e.g. from an `Embedding(mask_zero=True)`).
        attention_mask: optional (B, 1, T) mask, a key padding mask broadcast over queries,
            combined with `padding_mask`. FAVOR attention never forms the (T, T) attention
            matrix, so a dense (B, T, T) mask raises a ValueError (with
            `attention_type="softmax"` it is applied, as in `MultiHeadAttention`).
        training: whether dropout is active.

    Returns:
        (B, T, E), carrying the input's Keras mask.

    Example:

    >>> import numpy as np
    >>> encoder = FavorTransformerEncoder(intermediate_dim=32, num_heads=2,
    ...                                   num_random_features=16, seed=0)
    >>> x = np.random.rand(2, 10, 8).astype("float32")
    >>> tuple(encoder(x).shape)
    (2, 10, 8)

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794.
        Vaswani et al., Attention Is All You Need, arXiv 1706.03762.
        Su et al., RoFormer (rotary position embeddings), arXiv 2104.09864.
    """

    def build(self, inputs_shape):
        inputs_shape = tuple(inputs_shape)
        self._build_self_attention(inputs_shape, "inputs")
        self._build_feedforward(inputs_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None):
        mask = merged_padding_mask(inputs, padding_mask, "padding_mask")
        attention_mask = self._checked_attention_mask(attention_mask, "attention_mask", inputs)

        x = self._attention_sub_block(
            inputs, self._self_attention_layers(), None, (mask, mask, attention_mask), training
        )
        return self._feedforward(x, training)
