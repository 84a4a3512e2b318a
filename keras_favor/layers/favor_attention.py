"""FavorAttention: Performer (FAVOR+) multi-head attention, a drop-in for MultiHeadAttention.

Shape legend: B batch, T query length, S key length, E model width, N heads, H key dim,
D value dim, M random features, F features of the feature map.
"""

import keras
from keras import constraints, initializers, ops, regularizers

from keras_favor import feature_maps as feature_maps_lib
from keras_favor._checks import invalid, is_int, positive_int
from keras_favor.layers._masks import get_keras_mask, set_keras_mask
from keras_favor.ops.linear_attention import (
    check_padding_mask,
    favor_attention,
    favor_attention_step,
    favor_initial_state,
)
from keras_favor.ops.random_features import ROW_NORMS, random_features_matrix

# Derived seeds for redraws of a layer with an explicit integer seed (see `_draw_seed`).
_SEED_MULTIPLIER = 0x9E3779B1
_COUNT_MULTIPLIER = 0x85EBCA77


def _get_or_raise(module, identifier, name):
    try:
        return module.get(identifier)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Received an invalid value for argument `{name}` ({error}). "
            f"Received: {name}={identifier!r}"
        ) from error


def _count_dtype():
    # int64, except on JAX without x64 mode, where int64 silently becomes int32 (with a warning).
    if keras.backend.backend() == "jax":
        import jax  # the active backend: already imported

        if not jax.config.jax_enable_x64:
            return "int32"
    return "int64"


def _proj_equation(free_dims, bound_dims, output_dims):
    """Einsum equation, bias axes and output rank of a MultiHeadAttention projection."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    free = letters[:free_dims]
    bound = letters[free_dims : free_dims + bound_dims]
    out = letters[free_dims + bound_dims : free_dims + bound_dims + output_dims]
    return f"{free}{bound},{bound}{out}->{free}{out}", out, free_dims + output_dims


def _output_shape_spec(output_rank, known_last_dims):
    return [None] * (output_rank - len(known_last_dims)) + list(known_last_dims)


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorAttention(keras.layers.Layer):
    """Multi-head attention with FAVOR+ random features: time and memory linear in length.

    A drop-in for `keras.layers.MultiHeadAttention` in self- and cross-attention on (B, L, E)
    inputs. Queries, keys and values are projected exactly as in `MultiHeadAttention` (same
    sub-layers, shapes and order, so a trained `MultiHeadAttention`'s weights load into it), but
    softmax(QKᵀ/√H)V is replaced by D⁻¹ φ(Q) (φ(K)ᵀ V), where φ is a feature map whose inner
    products estimate (or replace) the softmax kernel. The T×S attention matrix is never formed.

    The random projection ω (M, H) is a non-trainable weight drawn once in `build`, saved with
    the model and used as is by `call`, so inference graphs hold no random or QR ops. Draw a fresh
    one with `redraw_random_features()` (or the `RedrawRandomFeatures` callback during `fit`);
    `redraw_count`, a non-trainable int64 scalar weight (int32 on JAX without x64 mode), counts
    the redraws. Both follow the four projections in `weights`, so
    `layer.set_weights(mha.get_weights() + layer.get_weights()[len(mha.weights):])` loads a
    `MultiHeadAttention`'s weights. Maps without random features (`"elu"`) have no
    `projection_matrix` (it is None).

    Masks: key padding masks (`value_mask`, `key_mask`, or Keras' implicit masks, e.g. from
    `Embedding(mask_zero=True)`) remove padded keys from both the numerator and the normaliser, so
    padding equals truncation. The query mask is passed on to the output, as in
    `MultiHeadAttention`. A dense (B, T, S) `attention_mask` cannot be honoured (see Call
    arguments); causal attention is `use_causal_mask=True`.

    Args:
        num_heads: N, the number of attention heads.
        key_dim: H, the size of each head for query and key.
        value_dim: D, the size of each head for value; defaults to `key_dim`.
        dropout: dropout rate. There is no attention matrix to drop entries from, so dropout is
            applied to the attention output of each head, (B, T, N, D), before the output
            projection, during training only.
        use_bias: whether the projections use bias vectors.
        output_shape: the last dimension(s) of the output (an int or a tuple); defaults to the
            query's last dimension.
        kernel_initializer: initializer for the projection kernels.
        bias_initializer: initializer for the projection biases.
        kernel_regularizer: regularizer for the projection kernels.
        bias_regularizer: regularizer for the projection biases.
        activity_regularizer: regularizer for the projections' outputs (as in
            `MultiHeadAttention`, it is applied by the four projections).
        kernel_constraint: constraint for the projection kernels.
        bias_constraint: constraint for the projection biases.
        feature_map: φ, a name (`"softmax_positive"`, the default: FAVOR+;
            `"softmax_hyperbolic"`, `"softmax_trig"`, `"softmax_optimal"`, `"relu"`, `"elu"`), a
            config dict or a `keras_favor.feature_maps.FeatureMap` (register subclasses of your own
            for serialization). Stored as a `FeatureMap` instance.
        num_random_features: M, the number of random features (rows of ω). Unused by maps without
            random features (`"elu"`).
        orthogonal: draw ω as stacked orthogonal blocks (lower variance) or i.i.d. Gaussian rows.
        row_norms: `"chi"` (every row marginally N(0, I): unbiased) or `"sqrt_dim"`.
        causal_chunk_size: C, the chunk length of the exact chunked causal algorithm.
        seed: None or an int. None gives every layer its own random projection; an int makes the
            projection reproducible: the first one equals
            `keras_favor.ops.random_features_matrix(num_random_features, key_dim, seed=seed)` and
            every redraw without a seed of its own is a fixed function of `seed` and
            `redraw_count`. Also seeds the dropout.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        query: (B, T, E_q).
        value: (B, S, E_v).
        key: optional (B, S, E_k); defaults to `value`.
        query_mask: optional (B, T) mask of the query; not used by the computation, set on the
            output (as in `MultiHeadAttention`). Filled in from `query`'s Keras mask.
        value_mask: optional (B, S) key padding mask, True (or 1) for real positions. Filled in
            from `value`'s Keras mask.
        key_mask: optional (B, S) key padding mask, combined with `value_mask`. Filled in from
            `key`'s Keras mask.
        attention_mask: only a (B, 1, S) mask is accepted (a key padding mask broadcast over
            queries). Linear attention never forms the T×S attention matrix, so a general
            (B, T, S) mask cannot be applied: it raises a ValueError.
        return_attention_scores: must be False: there are no attention scores to return.
        training: whether to apply dropout.
        use_causal_mask: position t attends to keys 0..t only (requires T == S), computed exactly
            by chunks in linear time.

    Returns:
        (B, T, E_out) in the layer's compute dtype, with E_out = `output_shape` or E_q. Features
        and the sums they feed are computed in float32 under any dtype policy.

    Example:

    >>> import numpy as np
    >>> layer = FavorAttention(num_heads=2, key_dim=8, num_random_features=32, seed=0)
    >>> x = np.random.rand(3, 10, 16).astype("float32")
    >>> tuple(layer(x, x, use_causal_mask=True).shape)
    (3, 10, 16)
    >>> tuple(layer.projection_matrix.shape)
    (32, 8)
    >>> layer.redraw_random_features()
    >>> int(layer.redraw_count.numpy())
    1

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        feature_map="softmax_positive",
        num_random_features=256,
        orthogonal=True,
        row_norms="chi",
        causal_chunk_size=128,
        seed=None,
        **kwargs,
    ):
        positive_int(num_heads, "num_heads")
        positive_int(key_dim, "key_dim")
        if value_dim is not None:
            positive_int(value_dim, "value_dim")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0.0 <= dropout < 1.0
        ):
            raise invalid("dropout", "a number in [0, 1)", dropout)
        if not isinstance(use_bias, bool):
            raise invalid("use_bias", "a bool", use_bias)
        if output_shape is not None:
            shape = (output_shape,) if is_int(output_shape) else output_shape
            if (
                not isinstance(shape, (tuple, list))
                or not shape
                or not all(is_int(d) and d > 0 for d in shape)
            ):
                raise invalid(
                    "output_shape", "None, a positive int or a tuple of positive ints", output_shape
                )
            output_shape = tuple(shape)
        kernel_initializer = _get_or_raise(initializers, kernel_initializer, "kernel_initializer")
        bias_initializer = _get_or_raise(initializers, bias_initializer, "bias_initializer")
        kernel_regularizer = _get_or_raise(regularizers, kernel_regularizer, "kernel_regularizer")
        bias_regularizer = _get_or_raise(regularizers, bias_regularizer, "bias_regularizer")
        activity_regularizer = _get_or_raise(
            regularizers, activity_regularizer, "activity_regularizer"
        )
        kernel_constraint = _get_or_raise(constraints, kernel_constraint, "kernel_constraint")
        bias_constraint = _get_or_raise(constraints, bias_constraint, "bias_constraint")
        feature_map = feature_maps_lib.get(feature_map)
        positive_int(num_random_features, "num_random_features")
        if not isinstance(orthogonal, bool):
            raise invalid("orthogonal", "a bool", orthogonal)
        if row_norms not in ROW_NORMS:
            raise invalid("row_norms", f"one of {ROW_NORMS}", row_norms)
        positive_int(causal_chunk_size, "causal_chunk_size")
        if seed is not None and (not is_int(seed) or seed < 0):
            raise invalid("seed", "None or a non-negative integer", seed)

        super().__init__(**kwargs)
        self.supports_masking = True
        self._num_heads = num_heads
        self._key_dim = key_dim
        self._value_dim = value_dim if value_dim is not None else key_dim
        self._dropout = float(dropout)
        self._use_bias = use_bias
        # Not exposed as `output_shape`: Functional / Sequential summaries read that attribute
        # (the same choice as MultiHeadAttention).
        self._output_shape = output_shape
        self._kernel_initializer = kernel_initializer
        self._bias_initializer = bias_initializer
        self._kernel_regularizer = kernel_regularizer
        self._bias_regularizer = bias_regularizer
        # As in MultiHeadAttention, the base layer's `activity_regularizer` stays None: the
        # projections apply it.
        self._activity_regularizer = activity_regularizer
        self._kernel_constraint = kernel_constraint
        self._bias_constraint = bias_constraint
        self._feature_map = feature_map
        self._num_random_features = num_random_features
        self._orthogonal = orthogonal
        self._row_norms = row_norms
        self._causal_chunk_size = causal_chunk_size
        self._seed = seed
        # Only an unseeded layer draws from a generator; a seeded one derives its seeds.
        self._seed_generator = keras.random.SeedGenerator(None) if seed is None else None
        self.projection_matrix = None
        self.redraw_count = None

    # ----------------------------------------------------------------------------------------
    # Arguments, read-only.

    @property
    def num_heads(self):
        return self._num_heads

    @property
    def key_dim(self):
        return self._key_dim

    @property
    def value_dim(self):
        return self._value_dim

    @property
    def dropout(self):
        return self._dropout

    @property
    def use_bias(self):
        return self._use_bias

    @property
    def kernel_initializer(self):
        return self._kernel_initializer

    @property
    def bias_initializer(self):
        return self._bias_initializer

    @property
    def kernel_regularizer(self):
        return self._kernel_regularizer

    @property
    def bias_regularizer(self):
        return self._bias_regularizer

    @property
    def kernel_constraint(self):
        return self._kernel_constraint

    @property
    def bias_constraint(self):
        return self._bias_constraint

    @property
    def feature_map(self):
        return self._feature_map

    @property
    def num_random_features(self):
        return self._num_random_features

    @property
    def orthogonal(self):
        return self._orthogonal

    @property
    def row_norms(self):
        return self._row_norms

    @property
    def causal_chunk_size(self):
        return self._causal_chunk_size

    @property
    def seed(self):
        return self._seed

    @property
    def query_dense(self):
        return self._query_dense

    @property
    def key_dense(self):
        return self._key_dense

    @property
    def value_dense(self):
        return self._value_dense

    @property
    def output_dense(self):
        return self._output_dense

    @property
    def uses_random_features(self):
        """Whether the feature map consumes the random projection `projection_matrix`."""
        return self._feature_map.uses_random_features

    def get_config(self):
        config = {
            "num_heads": self._num_heads,
            "key_dim": self._key_dim,
            "value_dim": self._value_dim,
            "dropout": self._dropout,
            "use_bias": self._use_bias,
            "output_shape": self._output_shape,
            "kernel_initializer": initializers.serialize(self._kernel_initializer),
            "bias_initializer": initializers.serialize(self._bias_initializer),
            "kernel_regularizer": regularizers.serialize(self._kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self._bias_regularizer),
            "activity_regularizer": regularizers.serialize(self._activity_regularizer),
            "kernel_constraint": constraints.serialize(self._kernel_constraint),
            "bias_constraint": constraints.serialize(self._bias_constraint),
            "feature_map": feature_maps_lib.serialize(self._feature_map),
            "num_random_features": self._num_random_features,
            "orthogonal": self._orthogonal,
            "row_norms": self._row_norms,
            "causal_chunk_size": self._causal_chunk_size,
            "seed": self._seed,
        }
        return {**super().get_config(), **config}

    # ----------------------------------------------------------------------------------------
    # Weights.

    def _sublayer_kwargs(self):
        # Fresh initializer instances per sub-layer, so that stateless initializers with a seed
        # do not give the four projections the same values (as MultiHeadAttention does).
        return dict(
            kernel_initializer=self._kernel_initializer.__class__.from_config(
                self._kernel_initializer.get_config()
            ),
            bias_initializer=self._bias_initializer.__class__.from_config(
                self._bias_initializer.get_config()
            ),
            kernel_regularizer=self._kernel_regularizer,
            bias_regularizer=self._bias_regularizer,
            activity_regularizer=self._activity_regularizer,
            kernel_constraint=self._kernel_constraint,
            bias_constraint=self._bias_constraint,
            dtype=self.dtype_policy,
        )

    def _projection(self, input_shape, heads_dim, name):
        equation, bias_axes, output_rank = _proj_equation(2, bound_dims=1, output_dims=2)
        dense = keras.layers.EinsumDense(
            equation,  # "abc,cde->abde": (B, L, E) -> (B, L, N, H)
            output_shape=_output_shape_spec(output_rank - 1, [self._num_heads, heads_dim]),
            bias_axes=bias_axes if self._use_bias else None,
            name=name,
            **self._sublayer_kwargs(),
        )
        dense.build(input_shape)
        return dense

    def build(self, query_shape, value_shape, key_shape=None):
        """Creates the projections (as MultiHeadAttention does), then ω and the redraw count."""
        key_shape = value_shape if key_shape is None else key_shape
        _check_input_shapes(query_shape, value_shape, key_shape)
        self._query_dense = self._projection(query_shape, self._key_dim, "query")
        self._key_dense = self._projection(key_shape, self._key_dim, "key")
        self._value_dense = self._projection(value_shape, self._value_dim, "value")
        self._dropout_layer = keras.layers.Dropout(
            rate=self._dropout, dtype=self.dtype_policy, seed=self._seed
        )
        out_shape = self._output_shape or (query_shape[-1],)
        equation, bias_axes, output_rank = _proj_equation(
            2, bound_dims=2, output_dims=len(out_shape)
        )
        self._output_dense = keras.layers.EinsumDense(
            equation,  # "abcd,cde->abe": (B, T, N, D) -> (B, T, E_out)
            output_shape=_output_shape_spec(output_rank - 1, out_shape),
            bias_axes=bias_axes if self._use_bias else None,
            name="attention_output",
            **self._sublayer_kwargs(),
        )
        self._output_dense.build((query_shape[0], query_shape[1], self._num_heads, self._value_dim))

        # "only_first_replica": under tf.distribute the value is the first replica's, never a sum.
        if self.uses_random_features:
            self.projection_matrix = self.add_weight(
                name="projection_matrix",
                shape=(self._num_random_features, self._key_dim),
                initializer=lambda shape, dtype=None: self._draw_projection(self._draw_seed(0)),
                dtype="float32",
                trainable=False,
                autocast=False,  # features are computed in float32 under any policy
                aggregation="only_first_replica",
            )
        self.redraw_count = self.add_weight(
            name="redraw_count",
            shape=(),
            initializer="zeros",
            dtype=_count_dtype(),
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        if type(self._feature_map).build is not feature_maps_lib.FeatureMap.build:
            # A map with weights: a copy of its own per layer, whose weights this layer owns.
            self._feature_map = type(self._feature_map).from_config(self._feature_map.get_config())
        self._feature_map.build(self, self._num_heads, self._key_dim)

    @property
    def weights(self):
        # MultiHeadAttention's weights first, in its order; then ω and the redraw count, so that
        # `layer.set_weights(mha.get_weights() + layer.get_weights()[len(mha.weights):])` works.
        weights = super().weights
        own = {id(v) for v in self._trainable_variables + self._non_trainable_variables}
        return [w for w in weights if id(w) not in own] + [w for w in weights if id(w) in own]

    # ----------------------------------------------------------------------------------------
    # Random features.

    def _draw_seed(self, count):
        if self._seed is None:
            return self._seed_generator
        if count == 0:
            return self._seed
        return (self._seed * _SEED_MULTIPLIER + count * _COUNT_MULTIPLIER) % (2**32)

    def _draw_projection(self, seed):
        return random_features_matrix(
            self._num_random_features,
            self._key_dim,
            orthogonal=self._orthogonal,
            row_norms=self._row_norms,
            seed=seed,
        )

    def redraw_random_features(self, seed=None):
        """Draws a new random projection ω into `projection_matrix` and adds 1 to `redraw_count`.

        Runs eagerly (it is meant for callbacks and between training steps, not for `call`). Under
        `tf.distribute`, call it in cross-replica context (as a callback does): every replica
        receives the same new matrix. A no-op for feature maps without random features.

        Args:
            seed: None or an int. An int gives exactly
                `random_features_matrix(num_random_features, key_dim, seed=seed)`. None uses the
                layer's own generator (`seed=None` layers) or a seed derived from the layer's
                `seed` and the new `redraw_count` (seeded layers: reproducible, also when training
                resumes from a checkpoint).
        """
        if seed is not None and (not is_int(seed) or seed < 0):
            raise invalid("seed", "None or a non-negative integer", seed)
        if not self.built:
            raise ValueError(
                f"Layer '{self.name}' must be built before `redraw_random_features` (call it on "
                "inputs first): it holds no projection yet. Received: built=False"
            )
        if not self.uses_random_features:
            return
        count = int(self.redraw_count.numpy()) + 1
        if seed is None:
            seed = self._draw_seed(count)
        self.projection_matrix.assign(self._draw_projection(seed))
        self.redraw_count.assign(ops.cast(count, self.redraw_count.dtype))

    # ----------------------------------------------------------------------------------------
    # Calls.

    def _validate_call(
        self,
        query_shape,
        value_shape,
        key_shape,
        attention_mask,
        return_attention_scores,
        use_causal_mask,
    ):
        if return_attention_scores:
            raise ValueError(
                "FavorAttention cannot return attention scores: linear attention computes "
                "φ(Q)(φ(K)ᵀV) and never forms the (T, S) attention matrix. "
                f"Received: return_attention_scores={return_attention_scores!r}"
            )
        if not isinstance(use_causal_mask, bool):
            raise invalid("use_causal_mask", "a bool", use_causal_mask)
        _check_input_shapes(query_shape, value_shape, key_shape)
        if use_causal_mask:
            t, s = query_shape[1], value_shape[1]
            if t is not None and s is not None and t != s:
                raise ValueError(
                    "use_causal_mask=True needs queries and keys of the same length (position t "
                    "attends to keys 0..t). Received: use_causal_mask=True with "
                    f"query.shape={tuple(query_shape)} and value.shape={tuple(value_shape)}"
                )
        if attention_mask is not None:
            shape = tuple(attention_mask.shape)
            if len(shape) != 3 or shape[1] != 1:
                raise ValueError(
                    "FavorAttention accepts only a (batch, 1, key_length) `attention_mask`, i.e. a "
                    "key padding mask: linear attention never forms the (T, S) attention matrix, "
                    "so it cannot mask individual query-key pairs. Use `value_mask` / `key_mask` "
                    "(or Keras masks) for padding and `use_causal_mask=True` for causal attention. "
                    f"Received: attention_mask.shape={shape}"
                )

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        key_shape = None if key is None else key.shape
        self._validate_call(
            query.shape,
            value.shape,
            key_shape,
            attention_mask,
            return_attention_scores,
            use_causal_mask,
        )
        if key is None:
            key = value
        # The masks were read into the *_mask arguments; detach them while the projections, which
        # do not support masking, run (as MultiHeadAttention does), and put them back afterwards,
        # so that calling the layer leaves the caller's tensors as they were.
        inputs = {id(t): t for t in (query, value, key)}.values()
        input_masks = [(t, get_keras_mask(t)) for t in inputs]
        for tensor, _ in input_masks:
            set_keras_mask(tensor, None)

        batch, key_length = value.shape[0], value.shape[1]
        padding_mask = None
        masks = (
            ("value_mask", value_mask),
            ("key_mask", key_mask),
            ("attention_mask", None if attention_mask is None else attention_mask[:, 0]),
        )
        for name, mask in masks:
            if mask is None:
                continue
            check_padding_mask(mask, name, batch, key_length)
            mask = ops.cast(mask, "bool")
            padding_mask = mask if padding_mask is None else ops.logical_and(padding_mask, mask)

        query = self._query_dense(query)  # (B, T, N, H)
        key = self._key_dense(key)  # (B, S, N, H)
        value = self._value_dense(value)  # (B, S, N, D)
        for tensor, mask in input_masks:
            if mask is not None:
                set_keras_mask(tensor, mask)
        output = favor_attention(
            query,
            key,
            value,
            self._feature_map,
            self.projection_matrix,
            causal=use_causal_mask,
            key_padding_mask=padding_mask,
            chunk_size=self._causal_chunk_size,
        )  # (B, T, N, D), computed in float32, returned in the compute dtype
        if self._dropout > 0.0:
            output = self._dropout_layer(output, training=training)
        output = self._output_dense(output)  # (B, T, E_out)
        if query_mask is not None:
            set_keras_mask(output, query_mask)
        return output

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        query_shape, value_shape = tuple(query_shape), tuple(value_shape)
        key_shape = value_shape if key_shape is None else tuple(key_shape)
        _check_input_shapes(query_shape, value_shape, key_shape)
        if self._output_shape:
            return query_shape[:-1] + self._output_shape
        return query_shape

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        key_shape = None if key is None else key.shape
        self._validate_call(
            query.shape,
            value.shape,
            key_shape,
            attention_mask,
            return_attention_scores,
            use_causal_mask,
        )
        for name, mask in (("value_mask", value_mask), ("key_mask", key_mask)):
            if mask is not None:
                check_padding_mask(mask, name, value.shape[0], value.shape[1])
        shape = self.compute_output_shape(query.shape, value.shape, key_shape)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    # ----------------------------------------------------------------------------------------
    # Streaming decoding.

    def get_initial_state(self, batch_size):
        """The empty decoding state (S, z), float32 zeros of fixed size.

        S (B, N, F, D) accumulates φ(k)vᵀ and z (B, N, F) accumulates φ(k), with F the number of
        features of the map (M, 2M or H).

        Args:
            batch_size: B, a positive int or a scalar integer tensor (e.g. inside a serving
                function, where the batch size is only known at run time).

        Returns:
            The pair (S, z).
        """
        if is_int(batch_size):
            positive_int(batch_size, "batch_size")
        else:
            shape = getattr(batch_size, "shape", None)
            dtype = str(getattr(batch_size, "dtype", ""))
            if shape is None or tuple(shape) != () or "int" not in dtype:
                raise invalid(
                    "batch_size", "a positive integer or a scalar integer tensor", batch_size
                )
        return favor_initial_state(
            batch_size,
            self._num_heads,
            self._key_dim,
            self._value_dim,
            self._feature_map,
            self._num_random_features,
        )

    def step(self, query, value, state, key=None):
        """One step of causal self-attention decoding with a fixed-size state.

        Equal, position by position, to `layer(x, x, use_causal_mask=True)` on the whole sequence
        (with `query = value = x[:, t]`), in O(1) time and memory per step.

        Args:
            query: (B, E_q), the new position's query input.
            value: (B, E_v), its value input.
            state: (S, z) from `get_initial_state` or a previous step.
            key: optional (B, E_k); defaults to `value`.

        Returns:
            The pair (output (B, E_out) in the compute dtype, new state).
        """
        return self._step(query, value, state, key)

    def _step(self, query, value, state, key, **query_key_kwargs):
        # The body of `step`; subclasses pass extra call arguments to the query and key
        # projections (e.g. the position, for rotary embeddings).
        key = value if key is None else key
        for name, x in (("query", query), ("value", value), ("key", key)):
            if len(x.shape) != 2:
                raise ValueError(
                    f"Argument `{name}` of `step` must have rank 2 (batch, features): one "
                    f"position. Received: {name}.shape={tuple(x.shape)}"
                )
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(
                "Argument `state` must be the pair (S, z) from `get_initial_state` or `step`. "
                f"Received: state={type(state).__name__}"
            )
        query = ops.convert_to_tensor(query, dtype=self.compute_dtype)
        value = ops.convert_to_tensor(value, dtype=self.compute_dtype)
        key = ops.convert_to_tensor(key, dtype=self.compute_dtype)
        if not self.built:
            self.build(
                (None, None, query.shape[-1]),
                (None, None, value.shape[-1]),
                (None, None, key.shape[-1]),
            )
        q = self._query_dense(ops.expand_dims(query, 1), **query_key_kwargs)[:, 0]  # (B, N, H)
        k = self._key_dense(ops.expand_dims(key, 1), **query_key_kwargs)[:, 0]  # (B, N, H)
        v = self._value_dense(ops.expand_dims(value, 1))[:, 0]  # (B, N, D)
        output, state = favor_attention_step(
            q, k, v, tuple(state), self._feature_map, self.projection_matrix
        )  # (B, N, D)
        output = self._output_dense(ops.expand_dims(output, 1))[:, 0]  # (B, E_out)
        return output, state


def _check_input_shapes(query_shape, value_shape, key_shape):
    for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
        if shape is not None and len(shape) != 3:
            raise ValueError(
                f"Argument `{name}` must have rank 3 (batch, length, features). "
                f"Received: {name}.shape={tuple(shape)}"
            )
    if key_shape is not None:
        s_v, s_k = value_shape[1], key_shape[1]
        if s_v is not None and s_k is not None and s_v != s_k:
            raise ValueError(
                "Arguments `key` and `value` must have the same length. "
                f"Received: key.shape={tuple(key_shape)}, value.shape={tuple(value_shape)}"
            )
