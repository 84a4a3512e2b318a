"""Base classes for attention feature maps φ.

Shape legend: B batch, N heads, L tokens (T queries or S keys), H key dim, M random features,
F output features of the map (M, 2M or H depending on the map).

A feature map turns queries and keys into non-negative (or, for the trigonometric baseline, signed)
features so that softmax-like attention becomes D⁻¹ φ(Q) (φ(K)ᵀ V). Maps receive tensors in the
head-major layout (B, N, L, H), in float32, and return (B, N, L, F) in float32.
"""

import keras
from keras import ops

# Nats kept below the causal key bound: key scales are at most e^40, far from float32's e^88.
CAUSAL_HEADROOM = 40.0


def _scaled_projection(projection_matrix, key_dim):
    # Folding the H^(-1/4) input scaling into ω once costs O(M·H) instead of a pass over the data.
    return ops.cast(projection_matrix, "float32") * (float(key_dim) ** -0.25)


# Sizes of the symbolic probe that tells whether a map uses random features, when no layer has
# probed it with its own sizes yet (any small sizes do: the probe computes no data).
_PROBE_KEY_DIM = 4
_PROBE_RANDOM_FEATURES = 8


def _overrides(feature_map, name):
    return getattr(type(feature_map), name) is not getattr(FeatureMap, name)


@keras.saving.register_keras_serializable(package="keras_favor")
class FeatureMap:
    """Base class of feature maps; subclass it for a map of your own.

    A simple map overrides only `features(x, projection_matrix, *, is_query)`; maps whose query
    and key features interact (stabilisers, data-dependent parameters) override `__call__`
    instead. What a map does not declare is inferred by running it once on symbolic inputs
    (`keras.KerasTensor`: shapes only, no data), when a layer is built around it:

    - `uses_random_features`: True when the map fails without a projection matrix ω (M, H) and
      runs with one;
    - `output_dim(key_dim, num_random_features)`: the number of features F it returns.

    Override them to declare them instead (a map that cannot run on symbolic inputs must). A map
    that runs neither way raises a ValueError naming what to define. A map may also define
    `build(layer, num_heads, key_dim)` to create trainable weights of its own with
    `layer.add_weight` (see `Hedgehog`): the layer then owns, trains and saves them, and each
    layer builds its own copy of the map (the probe runs on a copy built on a throwaway layer). Register a subclass with
    `keras.saving.register_keras_serializable` and give it a complete `get_config` (its
    constructor arguments, never its weights) so that models using it save and load.

    Example:

    >>> @keras.saving.register_keras_serializable(package="my_maps")
    ... class Squared(FeatureMap):
    ...     def features(self, x, projection_matrix=None, *, is_query):
    ...         return ops.square(x) + 1e-3
    >>> Squared().output_dim(key_dim=8), Squared().uses_random_features
    (8, False)
    """

    @property
    def uses_random_features(self):
        """Whether the map consumes a random projection matrix ω of shape (M, H).

        Inferred by a symbolic probe unless a subclass overrides it (see the class docstring).
        """
        probes = self.__dict__.get("_probes")
        if probes:  # a layer probed it with its own sizes already
            return next(iter(probes.values()))[0]
        return self._probe(_PROBE_KEY_DIM, _PROBE_RANDOM_FEATURES)[0]

    def output_dim(self, key_dim, num_random_features=None):
        """The number of features F the map returns for key dim H and M random features.

        Inferred by a symbolic probe unless a subclass overrides it (see the class docstring).
        """
        uses_random_features, dim = self._probe(key_dim, num_random_features)
        if uses_random_features and num_random_features is None:
            raise ValueError(
                f"feature_map={self!r} uses random features: its `output_dim` needs "
                "`num_random_features`. Received: num_random_features=None"
            )
        return dim

    def _probe(self, key_dim, num_random_features):
        """(uses_random_features, F) from a symbolic call on (1, 1, 2, H) queries and keys."""
        probes = self.__dict__.setdefault("_probes", {})
        sizes = (key_dim, num_random_features)
        if sizes not in probes:
            probes[sizes] = self._run_probe(key_dim, num_random_features or _PROBE_RANDOM_FEATURES)
        return probes[sizes]

    def _run_probe(self, key_dim, num_random_features):
        x = keras.KerasTensor((1, 1, 2, key_dim), dtype="float32")  # (B, N, L, H)
        omega = keras.KerasTensor((num_random_features, key_dim), dtype="float32")  # (M, H)
        declared = _overrides(self, "uses_random_features")
        probed = self
        if _overrides(self, "build"):
            # A map with weights runs as a copy built on a throwaway layer (one head).
            probed = type(self).from_config(self.get_config())
            probed.build(keras.layers.Layer(name="feature_map_probe"), 1, key_dim)
        errors = {}
        for uses in (self.uses_random_features,) if declared else (False, True):
            try:
                q_feat, k_feat = probed(x, x, omega if uses else None)
            except Exception as error:  # user code: any failure is reported below, as the cause
                errors[uses] = error
                continue
            return uses, self._probed_dim(q_feat, k_feat, key_dim, num_random_features)
        tried = "; ".join(
            f"with projection_matrix={'(M, H)' if uses else None}: {type(e).__name__}: {e}"
            for uses, e in errors.items()
        )
        if declared and not self.uses_random_features:
            advice = "if it consumes `projection_matrix`, define `uses_random_features` as True"
        else:
            advice = (
                "a map must run on float32 (..., H) tensors with or without ω; define "
                "`uses_random_features` and `output_dim(key_dim, num_random_features)` if it "
                "cannot run on symbolic inputs"
            )
        raise ValueError(
            f"Feature map {self!r} failed on symbolic queries and keys of shape "
            f"(1, 1, 2, {key_dim}) ({tried}): {advice}."
        ) from next(iter(errors.values()))

    def _probed_dim(self, q_feat, k_feat, key_dim, num_random_features):
        q_shape, k_shape = tuple(q_feat.shape), tuple(k_feat.shape)
        if len(q_shape) != 4 or q_shape != k_shape or not isinstance(q_shape[-1], int):
            raise ValueError(
                f"Feature map {self!r} must return (..., F) features of (..., H) queries and keys "
                "alike, with F a fixed number (`output_dim`). Received: for inputs of shape "
                f"(1, 1, 2, {key_dim}) and M={num_random_features}, query features of shape "
                f"{q_shape} and key features of shape {k_shape}"
            )
        return q_shape[-1]

    def build(self, layer, num_heads, key_dim):
        """Creates the map's own weights, if it has any; the default has none.

        `FavorAttention.build` calls it once, on a copy of the map made for that layer (so two
        layers never share weights). A map with weights creates them here with
        `layer.add_weight(...)`, so the layer owns, trains and saves them, and keeps references
        to them for `features` / `__call__`.

        Args:
            layer: the `keras.layers.Layer` that owns the weights.
            num_heads: N.
            key_dim: H.
        """

    def features(self, x, projection_matrix=None, *, is_query):
        """Features of x (..., H) → (..., F). Override this for a simple, per-token map."""
        raise NotImplementedError(
            f"{type(self).__name__} must override `features` (or `__call__`)."
        )

    def __call__(self, query, key, projection_matrix=None, *, causal=False, key_mask=None):
        """Query and key features.

        Args:
            query: (B, N, T, H) float32.
            key: (B, N, S, H) float32.
            projection_matrix: (M, H) or None.
            causal: whether the features feed causal attention (no statistic may use later tokens).
            key_mask: (B, 1, S, 1) float32, 1 for real keys and 0 for padding, or None. The caller
                zeroes padded keys afterwards; a map only needs it for statistics over keys.

        Returns:
            (B, N, T, F) query features and (B, N, S, F) key features, float32.
        """
        return (
            self.features(query, projection_matrix, is_query=True),
            self.features(key, projection_matrix, is_query=False),
        )

    def _call_factored(
        self, query, key, projection_matrix=None, *, causal=False, key_mask=None, low_dtype=None
    ):
        """Query features, key features and an optional per-key scale (B, N, S, 1) or None.

        The key features are the product of the last two; `favor_attention` folds the scale into
        the values instead of rescaling the (B, N, S, F) features. Padded keys have scale 0 when a
        scale is returned. The default has no scale and defers to `__call__` on float32 inputs;
        `low_dtype` (see `_low_precision_dtype`) is only used by maps that support it.
        """
        query, key = ops.cast(query, "float32"), ops.cast(key, "float32")
        q_feat, k_feat = self(query, key, projection_matrix, causal=causal, key_mask=key_mask)
        return q_feat, k_feat, None

    def _low_precision_dtype(self, dtype):
        """The dtype of this map's fast path for inputs of `dtype`, or None (float32 throughout).

        Only maps whose features are exponentials of stabilised logits have one (see
        `ExponentialFeatureMap.low_precision_logits`); every other map computes in float32.
        """
        return None

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ExponentialFeatureMap(FeatureMap):
    """Random features of the softmax kernel of the form exp(logits).

    Subclasses give the logits; this class applies the stabilisers, which cancel exactly in the
    normalised attention:

    - queries: the per-query max over features is subtracted (a per-query constant);
    - keys, non-causal: the max over all real (unpadded) keys and features of each (batch, head);
    - keys, causal: max(bound − 40, 0), where the bound is a data-independent upper bound of every
      key logit computed from ω alone (`logit_bound`) and 40 nats is `CAUSAL_HEADROOM`. No key can
      change how another is scaled: future tokens cannot leak, and a decoding state needs no
      running maximum. Every key's scale is at most e^40 ≈ 2e17, so sums stay finite in float32
      for any realistic length and value scale, while typical keys (largest logit near 0) keep
      scales near 1 instead of sitting ~50 nats below the bound (H=64, M=256). Only keys whose
      largest logit lies ~100 nats below the shift (huge key norms, where FAVOR's variance is
      astronomically high anyway) underflow to zero.

    For speed, `favor_attention` takes the key features in two factors (`_call_factored`):
    exp(logits − row max), all ≤ 1, and a per-key scale exp(row max + key_row_logits − shift),
    which multiplies the key's value row instead of its F features. The product is the same
    feature, with the same stabilisers; `__call__` returns it.
    """

    # Whether `logits` may receive x and w in bfloat16 (under a mixed_bfloat16 policy), to compute
    # the x·wᵀ matmul at bfloat16 speed. A map that sets it computes everything else in float32
    # from there on (use `project(x, w)` for the matmul: its result is float32).
    low_precision_logits = False

    @property
    def uses_random_features(self):
        return True

    def output_dim(self, key_dim, num_random_features=None):
        return num_random_features

    def parameters(self, query, key, projection_matrix, *, causal, key_mask):
        """Data-dependent parameters shared by the query and key logits (None by default)."""
        return None

    def logits(self, x, w, params, *, is_query):
        """Logits (B, N, L, F), float32, of x (B, N, L, H) with w = ω·H^(-1/4).

        x and w are float32, or bfloat16 on the fast path (`low_precision_logits`). Query logits
        may drop any per-query additive constant (the stabiliser removes it anyway).
        """
        raise NotImplementedError

    def logit_bound(self, w, params):
        """An upper bound of every key logit that depends on ω (and params) only."""
        raise NotImplementedError

    def key_row_logits(self, x, w, params):
        """Optional: the per-key term (B, N, L, 1) of the key logits, or None (the default).

        A map whose key logits are `logits(x, is_query=True)` plus a per-key term (such as
        −‖x‖²/2) returns that term here; the term then scales the key's value row instead of its
        F features, which saves passes over (B, N, L, F) tensors in the forward and backward pass.
        """
        return None

    def _own_call(self):
        return type(self).__call__ is not ExponentialFeatureMap.__call__

    def _low_precision_dtype(self, dtype):
        if self.low_precision_logits and not self._own_call() and str(dtype) == "bfloat16":
            return "bfloat16"
        return None

    def _call_factored(
        self, query, key, projection_matrix=None, *, causal=False, key_mask=None, low_dtype=None
    ):
        if self._own_call():  # a subclass's own __call__
            return super()._call_factored(
                query, key, projection_matrix, causal=causal, key_mask=key_mask
            )
        return self._exponential_features(
            query, key, projection_matrix, causal, key_mask, low_dtype
        )

    def _exponential_features(
        self, query, key, projection_matrix, causal, key_mask, low_dtype=None
    ):
        key_dim = query.shape[-1]
        w = _scaled_projection(projection_matrix, key_dim)  # (M, H)
        query32, key32 = ops.cast(query, "float32"), ops.cast(key, "float32")
        params = self.parameters(query32, key32, w, causal=causal, key_mask=key_mask)
        if low_dtype is None:
            x_q, x_k, w_logits = query32, key32, w
        else:
            # The fast path: the logits' matmul in low_dtype (float32 accumulation), and ω rounded
            # to it once, so that every term of a logit uses the same ω.
            w_logits = ops.cast(w, low_dtype)
            x_q, x_k = ops.cast(query, low_dtype), ops.cast(key, low_dtype)
        q_logits = self.logits(x_q, w_logits, params, is_query=True)  # (B, N, T, F)
        row = self.key_row_logits(key32, w, params)  # (B, N, S, 1) or None
        k_logits = self.logits(x_k, w_logits, params, is_query=row is not None)  # (B, N, S, F)
        # Every row is shifted by its own max; the key's total shift moves to the per-key scale.
        # The row max cancels exactly between the two factors, so stopping its gradient is exact.
        q_max = ops.stop_gradient(ops.max(q_logits, axis=-1, keepdims=True))  # (B, N, T, 1)
        k_max = ops.stop_gradient(ops.max(k_logits, axis=-1, keepdims=True))  # (B, N, S, 1)
        q_feat = ops.exp(q_logits - q_max)
        k_feat = ops.exp(k_logits - k_max)
        k_top = k_max if row is None else k_max + row  # (B, N, S, 1): each key's largest logit
        if key_mask is not None:
            # Padded keys: exp(-inf) = 0, never inf (nor a NaN gradient).
            k_top = ops.where(key_mask > 0, k_top, -float("inf"))
        if causal:
            # max(bound − 40, 0): scales ≤ e^40, and no shift at all when the bound is small.
            k_shift = ops.stop_gradient(
                ops.maximum(self.logit_bound(w, params) - CAUSAL_HEADROOM, 0.0)
            )
        else:
            k_shift = ops.max(k_top, axis=(2, 3), keepdims=True)  # (B, N, 1, 1), real keys only
            # Every key padded: no shift (their scales are 0 anyway).
            k_shift = ops.stop_gradient(ops.where(ops.isfinite(k_shift), k_shift, 0.0))
        return q_feat, k_feat, ops.exp(k_top - k_shift)

    def __call__(self, query, key, projection_matrix=None, *, causal=False, key_mask=None):
        q_feat, k_feat, k_scale = self._exponential_features(
            query, key, projection_matrix, causal, key_mask
        )
        return q_feat, k_feat * k_scale


def project(x, w):
    """x (..., H) times wᵀ, w (M, H): (..., M) in float32, whatever the dtype of x and w."""
    return ops.cast(ops.matmul(x, ops.transpose(w)), "float32")


def half_squared_norm(x):
    """‖x·H^(-1/4)‖² / 2 for x (..., H), keepdims: the −‖x‖²/2 term of softmax features."""
    key_dim = x.shape[-1]
    return ops.sum(ops.square(x), axis=-1, keepdims=True) * (0.5 / float(key_dim) ** 0.5)
