"""Shared pieces of `FavorTransformerEncoder` and `FavorTransformerDecoder`."""

import keras

from keras_favor import feature_maps as feature_maps_lib
from keras_favor._checks import invalid, positive_int, positive_number
from keras_favor.layers._rotary_favor_attention import RotaryFavorAttention
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.rotary_embedding import apply_rotary_embedding
from keras_favor.ops.random_features import ROW_NORMS

# Sub-seeds of a block: index 0 self-attention, 1 cross-attention, 2.. dropouts.
_SEED_MULTIPLIER = 0x9E3779B1
_INDEX_MULTIPLIER = 0x632BE5AB
SELF_ATTENTION, CROSS_ATTENTION, ATTENTION_DROPOUT, CROSS_DROPOUT, FEEDFORWARD_DROPOUT = range(5)

# "favor": FavorAttention (linear in length). "softmax": keras.layers.MultiHeadAttention, exact
# and quadratic, with the same weights: the reference a FAVOR block is compared with or
# converted from.
ATTENTION_TYPES = ("favor", "softmax")


def derive_seed(seed, index):
    """A distinct, reproducible seed per sub-layer of a block (None stays None).

    A hash-like mix, so that blocks seeded 0, 1, 2, ... give no sub-layer the seed of another
    block's sub-layer.
    """
    if seed is None:
        return None
    return (seed * _SEED_MULTIPLIER + (index + 1) * _INDEX_MULTIPLIER) % (2**31 - 1)


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
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise invalid("dropout", "a number in [0, 1)", dropout)
    try:
        activation = keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise invalid("activation", f"an activation name or callable ({error})", activation)
    positive_number(layer_norm_epsilon, "layer_norm_epsilon")
    initializers = []
    for name, value in (
        ("kernel_initializer", kernel_initializer),
        ("bias_initializer", bias_initializer),
    ):
        try:
            initializers.append(keras.initializers.get(value))
        except (ValueError, TypeError) as error:
            raise invalid(name, f"an initializer ({error})", value)
    for name, value in (
        ("normalize_first", normalize_first),
        ("orthogonal", orthogonal),
        ("use_rotary_embedding", use_rotary_embedding),
    ):
        if not isinstance(value, bool):
            raise invalid(name, "a bool", value)
    feature_map = feature_maps_lib.get(feature_map)
    positive_int(num_random_features, "num_random_features")
    if row_norms not in ROW_NORMS:
        raise invalid("row_norms", f"one of {ROW_NORMS}", row_norms)
    positive_int(causal_chunk_size, "causal_chunk_size")
    positive_number(rotary_max_wavelength, "rotary_max_wavelength")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise invalid("seed", "None or a non-negative integer", seed)
    if not isinstance(attention_type, str) or attention_type not in ATTENTION_TYPES:
        raise invalid("attention_type", f"one of {ATTENTION_TYPES}", attention_type)
    return activation, initializers[0], initializers[1], feature_map


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


class RotaryMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose projected queries and keys are rotated (RoPE).

    The exact counterpart of `RotaryFavorAttention` (positions 0..L-1 for queries and keys, the
    rotation applied after the projections), with the same weights. Internal to the blocks,
    which rebuild it from their own config.
    """

    def __init__(self, *args, rotary_max_wavelength=10000, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary_max_wavelength = rotary_max_wavelength

    def _compute_attention(self, query, key, value, *args, **kwargs):
        # query (B, T, N, H), key (B, S, N, H): rotate, then exact softmax attention.
        query = apply_rotary_embedding(query, 0, max_wavelength=self.rotary_max_wavelength)
        key = apply_rotary_embedding(key, 0, max_wavelength=self.rotary_max_wavelength)
        return super()._compute_attention(query, key, value, *args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "rotary_max_wavelength": self.rotary_max_wavelength}


def make_attention(block, key_dim, seed_index, name, rotary):
    """The block's attention layer (RoPE-capable if `rotary`).

    A `FavorAttention` with the block's options, or, with `attention_type="softmax"`, a
    `keras.layers.MultiHeadAttention` with the same sub-layers and weights (the FAVOR options are
    then unused).
    """
    kwargs = dict(
        num_heads=block.num_heads,
        key_dim=key_dim,
        dropout=block.dropout,
        kernel_initializer=clone_initializer(block.kernel_initializer),
        bias_initializer=clone_initializer(block.bias_initializer),
        seed=derive_seed(block.seed, seed_index),
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
        orthogonal=True,
        row_norms="chi",
        causal_chunk_size=128,
        use_rotary_embedding=False,
        rotary_max_wavelength=10000,
        seed=None,
        attention_type="favor",
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
        self.supports_masking = True

    def _build_self_attention(self, shape, name):
        """Builds the self-attention sub-layer, its layer norm and dropout; returns the key dim."""
        _, key_dim = hidden_dim_of(shape, name, self.num_heads, self.use_rotary_embedding)
        self._self_attention_layer = make_attention(
            self, key_dim, SELF_ATTENTION, "self_attention", self.use_rotary_embedding
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
            seed=derive_seed(self.seed, seed_index),
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
