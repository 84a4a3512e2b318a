"""Shared pieces of `FavorTransformerEncoder` and `FavorTransformerDecoder`."""

import keras

from keras_favor import feature_maps as feature_maps_lib
from keras_favor._checks import (
    boolean,
    keras_object,
    one_of,
    positive_int,
    positive_number,
    rate,
)
from keras_favor._checks import seed as check_seed
from keras_favor.layers._masks import check_attention_mask
from keras_favor.layers._rotary_attention import RotaryFavorAttention, RotaryMultiHeadAttention
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.ops.linear_attention import check_local_window
from keras_favor.ops.random_features import ROW_NORMS, derive_seed

# Sub-seeds of a block: index 0 self-attention, 1 cross-attention, 2.. dropouts.
SELF_ATTENTION, CROSS_ATTENTION, ATTENTION_DROPOUT, CROSS_DROPOUT, FEEDFORWARD_DROPOUT = range(5)

# "favor": FavorAttention (linear in length). "softmax": keras.layers.MultiHeadAttention, exact
# and quadratic, with the same weights: the reference a FAVOR block is compared with or
# converted from.
ATTENTION_TYPES = ("favor", "softmax")


def sub_seed(seed, index):
    """A distinct, reproducible seed per sub-layer of a block (None stays None)."""
    return None if seed is None else derive_seed(seed, "block", index)


def validate_block_args(
    *,
    intermediate_dim,
    num_heads,
    dropout,
    activation,
    layer_norm_epsilon,
    kernel_initializer,
    bias_initializer,
    normalize_first,
    feature_map,
    num_random_features,
    orthogonal,
    row_norms,
    causal_chunk_size,
    use_rotary_embedding,
    rotary_max_wavelength,
    seed,
    attention_type,
):
    """Checks every argument of a block; returns (activation, kernel_init, bias_init, map)."""
    positive_int(intermediate_dim, "intermediate_dim")
    positive_int(num_heads, "num_heads")
    rate(dropout, "dropout")
    activation = keras_object(keras.activations, activation, "activation", "an activation")
    positive_number(layer_norm_epsilon, "layer_norm_epsilon")
    kernel_initializer, bias_initializer = (
        keras_object(keras.initializers, value, name, "an initializer")
        for name, value in (
            ("kernel_initializer", kernel_initializer),
            ("bias_initializer", bias_initializer),
        )
    )
    boolean(normalize_first, "normalize_first")
    boolean(orthogonal, "orthogonal")
    boolean(use_rotary_embedding, "use_rotary_embedding")
    feature_map = feature_maps_lib.get(feature_map)
    positive_int(num_random_features, "num_random_features")
    one_of(row_norms, ROW_NORMS, "row_norms")
    positive_int(causal_chunk_size, "causal_chunk_size")
    positive_number(rotary_max_wavelength, "rotary_max_wavelength")
    check_seed(seed)
    one_of(attention_type, ATTENTION_TYPES, "attention_type")
    return activation, kernel_initializer, bias_initializer, feature_map


def clone_initializer(initializer):
    # A fresh instance per sub-layer (as keras-hub does), so a seeded initializer is not reused.
    return initializer.__class__.from_config(initializer.get_config())


def hidden_dim_of(shape, name, num_heads, use_rotary_embedding):
    """The model width E of a (B, L, E) input and the head size E // num_heads, checked."""
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"Argument `{name}` must have rank 3 (batch, length, features) with a known feature "
            f"size. Received: {name}.shape={tuple(shape)}"
        )
    hidden_dim = shape[-1]
    if hidden_dim % num_heads:
        raise ValueError(
            f"The feature size of `{name}` must be divisible by `num_heads`. "
            f"Received: {name}.shape={tuple(shape)}, num_heads={num_heads}"
        )
    key_dim = hidden_dim // num_heads
    if use_rotary_embedding and key_dim % 2:
        raise ValueError(
            "use_rotary_embedding=True needs an even head size (features // num_heads). "
            f"Received: {name}.shape={tuple(shape)}, num_heads={num_heads}"
        )
    return hidden_dim, key_dim


def make_attention(block, key_dim, seed_index, name, rotary, decay=None, local_window=None):
    """The block's attention layer (RoPE-capable if `rotary`).

    A `FavorAttention` with the block's options (and `decay`), or, with
    `attention_type="softmax"`, a `keras.layers.MultiHeadAttention` with the same sub-layers and
    weights (the FAVOR options are then unused).
    """
    kwargs = dict(
        num_heads=block.num_heads,
        key_dim=key_dim,
        dropout=block.dropout,
        kernel_initializer=clone_initializer(block.kernel_initializer),
        bias_initializer=clone_initializer(block.bias_initializer),
        seed=sub_seed(block.seed, seed_index),
        dtype=block.dtype_policy,
        name=name,
    )
    if block.attention_type == "softmax":
        if rotary:
            return RotaryMultiHeadAttention(
                rotary_max_wavelength=block.rotary_max_wavelength, **kwargs
            )
        return keras.layers.MultiHeadAttention(**kwargs)
    kwargs.update(
        feature_map=feature_maps_lib.serialize(block.feature_map),
        num_random_features=block.num_random_features,
        orthogonal=block.orthogonal,
        row_norms=block.row_norms,
        causal_chunk_size=block.causal_chunk_size,
    )
    if decay is not None:
        kwargs["decay"] = decay
    if local_window is not None:
        kwargs["local_window"] = local_window
    if rotary:
        return RotaryFavorAttention(rotary_max_wavelength=block.rotary_max_wavelength, **kwargs)
    return FavorAttention(**kwargs)


def block_config(block):
    """The get_config entries shared by both blocks."""
    return {
        "intermediate_dim": block.intermediate_dim,
        "num_heads": block.num_heads,
        "dropout": block.dropout,
        "activation": keras.activations.serialize(block.activation),
        "layer_norm_epsilon": block.layer_norm_epsilon,
        "kernel_initializer": keras.initializers.serialize(block.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(block.bias_initializer),
        "normalize_first": block.normalize_first,
        "feature_map": feature_maps_lib.serialize(block.feature_map),
        "num_random_features": block.num_random_features,
        "orthogonal": block.orthogonal,
        "row_norms": block.row_norms,
        "causal_chunk_size": block.causal_chunk_size,
        "use_rotary_embedding": block.use_rotary_embedding,
        "rotary_max_wavelength": block.rotary_max_wavelength,
        "seed": block.seed,
        "attention_type": block.attention_type,
        "local_window": block.local_window,
    }


class FavorBlockBase(keras.layers.Layer):
    """Arguments, feed-forward sub-block and config shared by the encoder and decoder blocks."""

    def __init__(
        self,
        intermediate_dim,
        num_heads,
        dropout=0.0,
        activation="relu",
        layer_norm_epsilon=1e-05,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        normalize_first=False,
        feature_map="softmax_positive",
        num_random_features=256,
        row_norms="chi",
        orthogonal=True,
        causal_chunk_size=128,
        use_rotary_embedding=False,
        rotary_max_wavelength=10000,
        seed=None,
        attention_type="favor",
        local_window=None,
        **kwargs,
    ):
        activation, kernel_initializer, bias_initializer, feature_map = validate_block_args(
            intermediate_dim=intermediate_dim,
            num_heads=num_heads,
            dropout=dropout,
            activation=activation,
            layer_norm_epsilon=layer_norm_epsilon,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            normalize_first=normalize_first,
            feature_map=feature_map,
            num_random_features=num_random_features,
            orthogonal=orthogonal,
            row_norms=row_norms,
            causal_chunk_size=causal_chunk_size,
            use_rotary_embedding=use_rotary_embedding,
            rotary_max_wavelength=rotary_max_wavelength,
            seed=seed,
            attention_type=attention_type,
        )
        if local_window is not None and attention_type != "favor":
            raise ValueError(
                "Argument `local_window` (exact attention within the window, FAVOR beyond it) "
                "needs attention_type='favor'. Received: "
                f"local_window={local_window!r}, attention_type={attention_type!r}"
            )
        check_local_window(local_window)
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.normalize_first = normalize_first
        self.feature_map = feature_map
        self.num_random_features = num_random_features
        self.orthogonal = orthogonal
        self.row_norms = row_norms
        self.causal_chunk_size = causal_chunk_size
        self.use_rotary_embedding = use_rotary_embedding
        self.rotary_max_wavelength = rotary_max_wavelength
        self.seed = seed
        self.attention_type = attention_type
        self.local_window = local_window
        self.supports_masking = True

    def _checked_attention_mask(self, mask, name, keys):
        """`mask` for an attention sub-layer whose keys are `keys` (B, S, E). FAVOR attention
        applies only a (B, 1, S) key padding mask: checked here, under the caller's name."""
        if mask is not None and self.attention_type == "favor":
            check_attention_mask(mask, name, keys.shape[0], keys.shape[1])
        return mask

    def _build_self_attention(self, shape, name, decay=None):
        """Builds the self-attention sub-layer, its layer norm and dropout; returns the key dim."""
        _, key_dim = hidden_dim_of(shape, name, self.num_heads, self.use_rotary_embedding)
        self._self_attention_layer = make_attention(
            self,
            key_dim,
            SELF_ATTENTION,
            "self_attention",
            self.use_rotary_embedding,
            decay,
            self.local_window,
        )
        self._self_attention_layer.build(shape, shape)
        self._self_attention_layer_norm = self._layer_norm("self_attention_layer_norm", shape)
        self._self_attention_dropout = self._dropout_layer(
            "self_attention_dropout", ATTENTION_DROPOUT
        )
        return key_dim

    def _layer_norm(self, name, shape):
        layer = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name
        )
        layer.build(shape)
        return layer

    def _dropout_layer(self, name, seed_index):
        return keras.layers.Dropout(
            rate=self.dropout,
            seed=sub_seed(self.seed, seed_index),
            dtype=self.dtype_policy,
            name=name,
        )

    def _build_feedforward(self, shape):
        hidden_dim = shape[-1]
        self._feedforward_layer_norm = self._layer_norm("feedforward_layer_norm", shape)
        self._feedforward_intermediate_dense = keras.layers.Dense(
            self.intermediate_dim,
            activation=self.activation,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="feedforward_intermediate_dense",
        )
        self._feedforward_intermediate_dense.build(shape)
        self._feedforward_output_dense = keras.layers.Dense(
            hidden_dim,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="feedforward_output_dense",
        )
        self._feedforward_output_dense.build(tuple(shape[:-1]) + (self.intermediate_dim,))
        self._feedforward_dropout = self._dropout_layer("feedforward_dropout", FEEDFORWARD_DROPOUT)

    def _residual(self, x, sublayer, layer_norm, dropout, training):
        """x + dropout(sublayer(x)), with the layer norm first (pre-LN) or last (post-LN)."""
        residual = x
        if self.normalize_first:
            x = layer_norm(x)
        x = dropout(sublayer(x), training=training)
        x = x + residual
        if not self.normalize_first:
            x = layer_norm(x)
        return x

    def _attention_sub_block(self, x, layers, value, masks, training, mix=None, **attention_kwargs):
        """x + dropout(attention(x, value)) with its layer norm (self-attention: value None).

        `layers` is (attention, layer norm, dropout); `masks` is (query_mask, value_mask,
        attention_mask); `mix`, if given, maps the attention's input before its projections.
        """
        attention, layer_norm, dropout = layers
        query_mask, value_mask, attention_mask = masks

        def attend(h):
            if mix is not None:
                h = mix(h)
            return attention(
                h,
                h if value is None else value,
                query_mask=query_mask,
                value_mask=value_mask,
                attention_mask=attention_mask,
                training=training,
                **attention_kwargs,
            )

        return self._residual(x, attend, layer_norm, dropout, training)

    def _self_attention_layers(self):
        return (
            self._self_attention_layer,
            self._self_attention_layer_norm,
            self._self_attention_dropout,
        )

    def _feedforward(self, x, training):
        def mlp(h):
            return self._feedforward_output_dense(self._feedforward_intermediate_dense(h))

        return self._residual(
            x, mlp, self._feedforward_layer_norm, self._feedforward_dropout, training
        )

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        return {**super().get_config(), **block_config(self)}
