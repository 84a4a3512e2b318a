"""FavorAttention: Performer (FAVOR+) multi-head attention, a drop-in for MultiHeadAttention.

Shape legend: B batch, T query length, S key length, E model width, N heads, H key dim,
D value dim, M random features, F features of the feature map.
"""

import inspect

import keras
from keras import ops

from keras_favor import _checks
from keras_favor import feature_maps as feature_maps_lib
from keras_favor.layers._masks import check_attention_mask, get_keras_mask, set_keras_mask
from keras_favor.ops.linear_attention import (
    check_local_window,
    check_padding_mask,
    favor_attention,
    favor_attention_step,
    favor_initial_state,
    head_decay,
)
from keras_favor.ops.random_features import ROW_NORMS, derive_seed, random_features_matrix

# MultiHeadAttention arguments with no FAVOR counterpart: the values accepted (they change nothing).
_INERT_MHA_ARGUMENTS = {
    "sliding_window": (None,),
    "use_gate": (False,),
    "flash_attention": (None, False),
}


def _count_dtype():
    # int64, except on JAX without x64 mode, where int64 silently becomes int32 (with a warning).
    if keras.backend.backend() == "jax":
        import jax  # the active backend: already imported

        if not jax.config.jax_enable_x64:
            return "int32"
    return "int64"


def _output_shape(output_shape):
    if output_shape is None:
        return None
    shape = (output_shape,) if _checks.is_int(output_shape) else output_shape
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or not all(_checks.is_int(d) and d > 0 for d in shape)
    ):
        raise _checks.invalid(
            "output_shape", "None, a positive int or a tuple of positive ints", output_shape
        )
    return tuple(shape)


def _attention_axes(attention_axes):
    # The sequence axis of (B, L, E) inputs is 1 (or -2); stored as None or (1,).
    axes = (attention_axes,) if _checks.is_int(attention_axes) else attention_axes
    if axes is None or (isinstance(axes, (tuple, list)) and list(axes) in ([1], [-2])):
        return None if axes is None else (1,)
    raise _checks.invalid(
        "attention_axes",
        "None or the sequence axis of (batch, length, features) inputs (1, -2 or (1,)): FAVOR "
        "attends over that one axis",
        attention_axes,
    )


def _check_inert_arguments(kwargs):
    for name, accepted in _INERT_MHA_ARGUMENTS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if not any(value is a for a in accepted):
                raise _checks.invalid(
                    name,
                    f"one of {accepted}: FavorAttention (linear attention) does not support "
                    f"MultiHeadAttention's `{name}`",
                    value,
                )


def _read_only(name):
    # MultiHeadAttention keeps these arguments as private attributes only.
    return property(lambda self: getattr(self, f"_{name}"), doc=f"The `{name}` argument.")


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention with FAVOR+ random features: time and memory linear in length.

    A drop-in for `keras.layers.MultiHeadAttention` in self- and cross-attention on (B, L, E)
    inputs, and a subclass of it: queries, keys and values are projected by its sub-layers (same
    shapes and order, so a trained `MultiHeadAttention`'s weights load into it), but
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
        decay: a per-head decay γ of the causal state (RetNet-style), for causal attention
            only: S_t = γ·S_(t−1) + φ(k_t)v_tᵀ and z_t = γ·z_(t−1) + φ(k_t), so a key t − j
            positions back weighs γ^(t−j) (a reach of about 1/(1 − γ) positions). None (the
            default: no decay); `"retnet"`: γ_h = 1 − 2^(−5−h) for head h; one number in (0, 1]
            for every head; or a list of `num_heads` numbers in (0, 1] (1: no decay), e.g. from
            `keras_favor.ops.decay_rates(num_heads, longest_reach=...)`, which caps the slowest
            head's reach. Exact in the chunked causal form and in `step`, at the same cost and
            state size. Calling a layer with a decay without `use_causal_mask=True` raises a
            ValueError.
        local_window: None (default) or a positive int w: exact softmax over neighbours, the
            feature map beyond them (a hybrid in the manner of LoLCATs, arXiv 2410.10254).
            Query t weighs the keys with |t − s| < w (causal: the last w, itself included)
            exactly, exp(q_t·k_s/√H − c_t) with c_t their largest score, and every other key
            by the map's kernel α_t·φ(q_t)·φ(k_s), where α_t = Σ_window exp(·) / Σ_window
            φ(q_t)·φ(k_s) calibrates the kernel on the window (so any map mixes with exact
            weights: its per-query and per-sequence scales cancel); one normaliser for both.
            The map thus decides how much attention goes beyond the window, exact softmax how
            it is spread within. A window covering the whole sequence is exact softmax. Cost
            O(L·w) more than FAVOR; streaming keeps the last w keys and values in the state
            (`state_size` 4). Self-attention only (queries and keys of the same length).
        seed: None or an int. None gives every layer its own random projection; an int makes the
            projection reproducible: the first one equals
            `keras_favor.ops.random_features_matrix(num_random_features, key_dim, seed=seed)` and
            every redraw without a seed of its own is a fixed function of `seed` and
            `redraw_count`. Also seeds the dropout.
        attention_axes: None, or the sequence axis of (B, L, E) inputs (`1`, `-2`, `(1,)`): FAVOR
            attends over that one axis. Any other value raises a ValueError.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`, ...). Of
            `MultiHeadAttention`'s other arguments, only the values that change nothing are
            accepted (`sliding_window=None`, `use_gate=False`, `flash_attention=None` or False):
            linear attention has no band mask, gate or flash kernel.

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
        (B, T, E_out) in the layer's compute dtype, with E_out = `output_shape` or E_q. The
        stabilisers, `exp`, the sums over keys (the causal state) and the normaliser are float32
        under any dtype policy. Under `mixed_bfloat16` the exponential maps (`softmax_positive`,
        `softmax_hyperbolic`, `softmax_optimal`) take a fast path: the feature logits and the
        linear-attention products run in bfloat16 with float32 accumulation (see
        `keras_favor.ops.favor_attention`'s `matmul_dtype`). Every other map, and
        `mixed_float16` (whose range cannot hold the causal key scales), computes in float32.
        `step` (decoding) computes in float32 under every policy.

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

    kernel_initializer = _read_only("kernel_initializer")
    bias_initializer = _read_only("bias_initializer")
    kernel_regularizer = _read_only("kernel_regularizer")
    bias_regularizer = _read_only("bias_regularizer")
    kernel_constraint = _read_only("kernel_constraint")
    bias_constraint = _read_only("bias_constraint")

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
        attention_axes=None,
        decay=None,
        local_window=None,
        **kwargs,
    ):
        _checks.positive_int(num_heads, "num_heads")
        _checks.positive_int(key_dim, "key_dim")
        _checks.positive_int(value_dim, "value_dim", allow_none=True)
        dropout = _checks.rate(dropout, "dropout")
        _checks.boolean(use_bias, "use_bias")
        keras_objects = {}
        for name, module, what, value in (
            ("kernel_initializer", keras.initializers, "an initializer", kernel_initializer),
            ("bias_initializer", keras.initializers, "an initializer", bias_initializer),
            ("kernel_regularizer", keras.regularizers, "a regularizer", kernel_regularizer),
            ("bias_regularizer", keras.regularizers, "a regularizer", bias_regularizer),
            ("activity_regularizer", keras.regularizers, "a regularizer", activity_regularizer),
            ("kernel_constraint", keras.constraints, "a constraint", kernel_constraint),
            ("bias_constraint", keras.constraints, "a constraint", bias_constraint),
        ):
            keras_objects[name] = _checks.keras_object(module, value, name, what)
        feature_map = feature_maps_lib.get(feature_map)
        _checks.positive_int(num_random_features, "num_random_features")
        _checks.boolean(orthogonal, "orthogonal")
        _checks.one_of(row_norms, ROW_NORMS, "row_norms")
        _checks.positive_int(causal_chunk_size, "causal_chunk_size")
        _checks.seed(seed)
        head_decay(decay, num_heads)
        check_local_window(local_window)
        _check_inert_arguments(kwargs)
        # What the map does not declare is inferred now, so that a map that cannot run fails here.
        feature_map.output_dim(key_dim, num_random_features)

        super().__init__(
            num_heads,
            key_dim,
            value_dim=value_dim,
            dropout=0.0,  # set below: MultiHeadAttention refuses dropout if flash attention is on
            use_bias=use_bias,
            output_shape=_output_shape(output_shape),
            attention_axes=_attention_axes(attention_axes),
            seed=seed,
            **keras_objects,
            **kwargs,
        )
        self._dropout = dropout
        self.feature_map = feature_map
        self.num_random_features = num_random_features
        self.orthogonal = orthogonal
        self.row_norms = row_norms
        self.causal_chunk_size = causal_chunk_size
        self.decay = list(decay) if isinstance(decay, tuple) else decay
        self.local_window = local_window
        # Only an unseeded layer draws from a generator; a seeded one derives its seeds.
        self._seed_generator = keras.random.SeedGenerator(None) if seed is None else None
        self.projection_matrix = None
        self.redraw_count = None

    @property
    def uses_random_features(self):
        """Whether the feature map consumes the random projection `projection_matrix`."""
        return self.feature_map.uses_random_features

    def get_config(self):
        config = super().get_config()
        for name in _INERT_MHA_ARGUMENTS:
            config.pop(name, None)
        return {
            **config,
            "feature_map": feature_maps_lib.serialize(self.feature_map),
            "num_random_features": self.num_random_features,
            "orthogonal": self.orthogonal,
            "row_norms": self.row_norms,
            "causal_chunk_size": self.causal_chunk_size,
            "decay": self.decay,
            "local_window": self.local_window,
        }

    # ----------------------------------------------------------------------------------------
    # Weights.

    def build(self, query_shape, value_shape, key_shape=None):
        """Builds MultiHeadAttention's projections, then ω and the redraw count."""
        query_shape, value_shape = tuple(query_shape), tuple(value_shape)
        key_shape = value_shape if key_shape is None else tuple(key_shape)
        _check_input_shapes(query_shape, value_shape, key_shape)
        # The key projection depends on the key's width only; lengths were checked above (an
        # unknown length matches a known one, which MultiHeadAttention's check refuses).
        super().build(query_shape, value_shape, value_shape[:-1] + key_shape[-1:])

        # "only_first_replica": under tf.distribute the value is the first replica's, never a sum.
        if self.uses_random_features:
            self.projection_matrix = self.add_weight(
                name="projection_matrix",
                shape=(self.num_random_features, self._key_dim),
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
        if type(self.feature_map).build is not feature_maps_lib.FeatureMap.build:
            # A map with weights: a copy of its own per layer, whose weights this layer owns.
            self.feature_map = type(self.feature_map).from_config(self.feature_map.get_config())
        self.feature_map.build(self, self._num_heads, self._key_dim)

    def _build_attention(self, rank):
        # No softmax and no score equations: FAVOR's only attention sub-layer is the dropout on
        # the head outputs.
        self._dropout_layer = keras.layers.Dropout(
            rate=self._dropout, dtype=self.dtype_policy, seed=self.seed
        )

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
        if self.seed is None:
            return self._seed_generator
        return self.seed if count == 0 else derive_seed(self.seed, "redraw", count)

    def _draw_projection(self, seed):
        return random_features_matrix(
            self.num_random_features,
            self._key_dim,
            orthogonal=self.orthogonal,
            row_norms=self.row_norms,
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
        _checks.seed(seed)
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

    def _validate_call(self, query, value, key, masks, return_attention_scores, use_causal_mask):
        if return_attention_scores:
            raise ValueError(
                "FavorAttention cannot return attention scores: linear attention computes "
                "φ(Q)(φ(K)ᵀV) and never forms the (T, S) attention matrix. "
                f"Received: return_attention_scores={return_attention_scores!r}"
            )
        _checks.boolean(use_causal_mask, "use_causal_mask")
        if self.decay is not None and not use_causal_mask:
            raise ValueError(
                "Argument `decay` (a decay of the causal state) needs `use_causal_mask=True`: "
                "FavorAttention has no decay for bidirectional attention. Received: "
                f"decay={self.decay!r}, use_causal_mask={use_causal_mask!r}"
            )
        key_shape = None if key is None else tuple(key.shape)
        _check_input_shapes(tuple(query.shape), tuple(value.shape), key_shape)
        batch, key_length = value.shape[0], value.shape[1]
        if use_causal_mask:
            t = query.shape[1]
            if t is not None and key_length is not None and t != key_length:
                raise ValueError(
                    "use_causal_mask=True needs queries and keys of the same length (position t "
                    "attends to keys 0..t). Received: use_causal_mask=True with "
                    f"query.shape={tuple(query.shape)} and value.shape={tuple(value.shape)}"
                )
        for name, mask in masks.items():
            if mask is None:
                continue
            if name == "attention_mask":
                check_attention_mask(mask, name, batch, key_length)
            else:
                check_padding_mask(mask, name, batch, key_length)

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
        masks = {"value_mask": value_mask, "key_mask": key_mask, "attention_mask": attention_mask}
        self._validate_call(query, value, key, masks, return_attention_scores, use_causal_mask)
        if attention_mask is not None:
            masks["attention_mask"] = attention_mask[:, 0]  # (B, 1, S) -> (B, S)
        padding_mask = None  # (B, S), True for real keys
        for mask in masks.values():
            if mask is not None:
                mask = ops.cast(mask, "bool")
                padding_mask = mask if padding_mask is None else ops.logical_and(padding_mask, mask)
        key = value if key is None else key
        # The masks were read into the *_mask arguments; detach them while the projections, which
        # do not support masking, run (as MultiHeadAttention does), and put them back afterwards,
        # so that calling the layer leaves the caller's tensors as they were.
        inputs = {id(t): t for t in (query, value, key)}.values()
        input_masks = [(t, get_keras_mask(t)) for t in inputs]
        for tensor, _ in input_masks:
            set_keras_mask(tensor, None)
        query = self._query_dense(query)  # (B, T, N, H)
        key = self._key_dense(key)  # (B, S, N, H)
        value = self._value_dense(value)  # (B, S, N, D)
        for tensor, mask in input_masks:
            if mask is not None:
                set_keras_mask(tensor, mask)
        output, _ = self._compute_attention(
            query, key, value, padding_mask, training, use_causal_mask=use_causal_mask
        )
        output = self._output_dense(output)  # (B, T, E_out)
        if query_mask is not None:
            set_keras_mask(output, query_mask)
        return output

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        """FAVOR attention of projected (B, T, N, H) queries, (B, S, N, H) keys and (B, S, N, D)
        values; `attention_mask` is the (B, S) key padding mask. Returns ((B, T, N, D), None)."""
        output = favor_attention(
            query,
            key,
            value,
            self.feature_map,
            self.projection_matrix,
            causal=use_causal_mask,
            key_padding_mask=attention_mask,
            chunk_size=self.causal_chunk_size,
            decay=self.decay,
            local_window=self.local_window,
        )  # computed in float32, returned in the compute dtype
        if self._dropout > 0.0:
            output = self._dropout_layer(output, training=training)
        return output, None

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        query_shape, value_shape = tuple(query_shape), tuple(value_shape)
        _check_input_shapes(
            query_shape, value_shape, None if key_shape is None else tuple(key_shape)
        )
        return query_shape[:-1] + (self._output_shape or query_shape[-1:])

    def compute_output_spec(self, *args, **kwargs):
        # Called with the arguments of `call`: the same checks, on symbolic shapes.
        arguments = inspect.signature(self.call).bind(*args, **kwargs).arguments
        masks = {name: arguments.get(name) for name in ("value_mask", "key_mask", "attention_mask")}
        self._validate_call(
            arguments["query"],
            arguments["value"],
            arguments.get("key"),
            masks,
            arguments.get("return_attention_scores", False),
            arguments.get("use_causal_mask", False),
        )
        return super().compute_output_spec(
            arguments["query"], arguments["value"], arguments.get("key")
        )

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
        if _checks.is_int(batch_size):
            _checks.positive_int(batch_size, "batch_size")
        else:
            shape = getattr(batch_size, "shape", None)
            dtype = str(getattr(batch_size, "dtype", ""))
            if shape is None or tuple(shape) != () or "int" not in dtype:
                raise _checks.invalid(
                    "batch_size", "a positive integer or a scalar integer tensor", batch_size
                )
        return favor_initial_state(
            batch_size,
            self._num_heads,
            self._key_dim,
            self._value_dim,
            self.feature_map,
            self.num_random_features,
            self.local_window,
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

    def _step(self, query, value, state, key, **step_kwargs):
        # The body of `step`; subclasses pass extra arguments on to `_compute_step` (e.g. the
        # position, for rotary embeddings).
        key = value if key is None else key
        for name, x in (("query", query), ("value", value), ("key", key)):
            if len(x.shape) != 2:
                raise ValueError(
                    f"Argument `{name}` of `step` must have rank 2 (batch, features): one "
                    f"position. Received: {name}.shape={tuple(x.shape)}"
                )
        size = self.state_size
        if not isinstance(state, (tuple, list)) or len(state) != size:
            raise ValueError(
                f"Argument `state` must be the {size} arrays from `get_initial_state` or `step`. "
                f"Received: state={type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
            )
        query, value, key = (
            ops.expand_dims(ops.convert_to_tensor(x, dtype=self.compute_dtype), 1)
            for x in (query, value, key)
        )  # (B, 1, E)
        if not self.built:
            self.build(*((None, None, x.shape[-1]) for x in (query, value, key)))
        output, state = self._compute_step(
            self._query_dense(query),  # (B, 1, N, H)
            self._key_dense(key),  # (B, 1, N, H)
            self._value_dense(value),  # (B, 1, N, D)
            tuple(state),
            **step_kwargs,
        )  # (B, N, D)
        return self._output_dense(ops.expand_dims(output, 1))[:, 0], state  # (B, E_out)

    def _compute_step(self, query, key, value, state):
        """One decoding step of projected (B, 1, N, ·) inputs: ((B, N, D) output, new state)."""
        return favor_attention_step(
            query[:, 0],
            key[:, 0],
            value[:, 0],
            state,
            self.feature_map,
            self.projection_matrix,
            decay=self.decay,
            local_window=self.local_window,
        )

    @property
    def state_size(self):
        """How many arrays the decoding state has: 2 (S, z), or 4 with a `local_window`."""
        return 2 if self.local_window is None else 4


def _check_input_shapes(query_shape, value_shape, key_shape):
    """Ranks, key and value lengths and batch sizes of the (B, L, E) inputs, named as given."""
    shapes = {"query": query_shape, "value": value_shape}
    if key_shape is not None:
        shapes["key"] = key_shape
    for name, shape in shapes.items():
        if len(shape) != 3:
            raise ValueError(
                f"Argument `{name}` must have rank 3 (batch, length, features). "
                f"Received: {name}.shape={tuple(shape)}"
            )
    for (a, b), axis, what in (
        (("value", "key"), 1, "length"),
        (("query", "value"), 0, "batch size"),
        (("query", "key"), 0, "batch size"),
    ):
        if b not in shapes:
            continue
        da, db = shapes[a][axis], shapes[b][axis]
        if da is not None and db is not None and da != db:
            raise ValueError(
                f"Arguments `{a}` and `{b}` must have the same {what}. "
                f"Received: {a}.shape={tuple(shapes[a])}, {b}.shape={tuple(shapes[b])}"
            )
