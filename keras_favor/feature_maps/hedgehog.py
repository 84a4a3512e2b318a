"""Hedgehog: learnable per-head feature maps trained to mimic softmax attention."""

import keras
from keras import initializers, ops

from keras_favor._checks import invalid, positive_int
from keras_favor.feature_maps.feature_map import FeatureMap
from keras_favor.ops.random_features import random_features_matrix

KERNEL_INITIALIZERS = ("identity", "random_features")


def _identity(num_heads, key_dim, feature_dim):
    # (N, H, F'): every head starts as eye(H, F') (the Hedgehog paper's initialisation).
    eye = ops.eye(key_dim, feature_dim, dtype="float32")
    return ops.tile(ops.expand_dims(eye, 0), (num_heads, 1, 1))


def _random_features(num_heads, key_dim, feature_dim, seed):
    # (N, H, F'): per head, F' orthogonal Gaussian rows ω (chi norms) scaled by H^(-1/4).
    w = random_features_matrix(num_heads * feature_dim, key_dim, seed=seed)  # (N·F', H)
    w = ops.reshape(w * float(key_dim) ** -0.25, (num_heads, feature_dim, key_dim))
    return ops.transpose(w, (0, 2, 1))


@keras.saving.register_keras_serializable(package="keras_favor")
class Hedgehog(FeatureMap):
    """Learnable features φ(x) = [softmax(xW + b), softmax(−(xW + b))], per head, 2F' features.

    A trainable projection W (H, F') and bias b (F') per head, followed by a softmax over the
    feature axis of the projection and of its negation. Every feature is positive and at most 1,
    so sums cannot overflow under any dtype policy and the normaliser is a sum of positive
    terms; features are per token, so causal attention, masks and streaming decode need nothing
    special. The weights are created by `build` on the `FavorAttention` layer that uses the map
    (one copy of the map per layer), so the layer owns, trains and saves them. Train them with
    ordinary `fit`, or to mimic an existing softmax model with
    `keras_favor.convert.attention_transfer`.

    Initialisations (`kernel_initializer`):

    - ``"identity"`` (the paper's): W = eye(H, F'), b = 0; φ(x) = [softmax(x), softmax(−x)].
    - ``"random_features"``: W = ω·H^(-1/4) with ω orthogonal Gaussian rows (F' per head),
      b = 0. Then softmax(xW) = exp(ωᵀx')/Σ_m exp(ω_mᵀx') with x' = x·H^(-1/4), whose
      denominator estimates F'·exp(‖x'‖²/2): the map starts as (antithetic) FAVOR+ positive
      random features of the softmax kernel exp(qᵀk/√H), with F' random features.
    - any Keras initializer for W (b starts at 0).

    String name: ``"hedgehog"``.

    Args:
        feature_dim: F', the width of the projection (the map returns 2F' features); None
            (default) uses the key dim H.
        shared_query_key: one projection for queries and keys (True) or one each (False,
            default, as in the paper).
        use_bias: whether the projections have a bias.
        kernel_initializer: ``"random_features"`` (default), ``"identity"`` or a Keras
            initializer (name, config or instance) of the (N, H, F') kernels.

    Example:

    >>> import numpy as np
    >>> from keras_favor import FavorAttention
    >>> layer = FavorAttention(num_heads=2, key_dim=8, feature_map="hedgehog", seed=0)
    >>> x = np.random.rand(3, 10, 16).astype("float32")
    >>> tuple(layer(x, x, use_causal_mask=True).shape)
    (3, 10, 16)
    >>> [w.path for w in layer.trainable_weights[-4:]]  # doctest: +NORMALIZE_WHITESPACE
    ['favor_attention/hedgehog_query_kernel', 'favor_attention/hedgehog_query_bias',
     'favor_attention/hedgehog_key_kernel', 'favor_attention/hedgehog_key_bias']

    References:
        Zhang et al., The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
        Mimicry, arXiv 2402.04347.
        Zhang et al., LoLCATs: On Low-Rank Linearizing of Large Language Models,
        arXiv 2410.10254.
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794.
    """

    def __init__(
        self,
        feature_dim=None,
        shared_query_key=False,
        use_bias=True,
        kernel_initializer="random_features",
    ):
        positive_int(feature_dim, "feature_dim", allow_none=True)
        for name, value in (("shared_query_key", shared_query_key), ("use_bias", use_bias)):
            if not isinstance(value, bool):
                raise invalid(name, "a bool", value)
        if not (isinstance(kernel_initializer, str) and kernel_initializer in KERNEL_INITIALIZERS):
            try:
                kernel_initializer = initializers.get(kernel_initializer)
            except (ValueError, TypeError):
                raise invalid(
                    "kernel_initializer",
                    f"one of {KERNEL_INITIALIZERS} or a Keras initializer",
                    kernel_initializer,
                ) from None
        self.feature_dim = feature_dim
        self.shared_query_key = shared_query_key
        self.use_bias = use_bias
        self.kernel_initializer = kernel_initializer
        self.query_kernel = self.query_bias = self.key_kernel = self.key_bias = None

    @property
    def uses_random_features(self):
        return False

    def output_dim(self, key_dim, num_random_features=None):
        return 2 * (self.feature_dim or key_dim)

    def build(self, layer, num_heads, key_dim):
        feature_dim = self.feature_dim or key_dim
        init = self.kernel_initializer
        shape = (num_heads, key_dim, feature_dim)
        # Queries and keys start from the same kernel (random features must be shared).
        if init == "identity":
            start = _identity(*shape)
        elif init == "random_features":
            start = _random_features(*shape, seed=getattr(layer, "seed", None))
        else:
            start = init.__class__.from_config(init.get_config())(shape, dtype="float32")

        def kernel_init(shape, dtype=None):
            return ops.copy(start)  # one buffer per variable (JAX donates each buffer once)

        def weight(name, shape, initializer):
            return layer.add_weight(
                name=f"hedgehog_{name}",
                shape=shape,
                initializer=initializer,
                dtype="float32",
                autocast=False,  # features are computed in float32 under any policy
            )

        roles = ("query",) if self.shared_query_key else ("query", "key")
        for role in roles:
            kernel = weight(f"{role}_kernel", shape, kernel_init)
            bias = None
            if self.use_bias:
                bias = weight(f"{role}_bias", (num_heads, 1, feature_dim), "zeros")
            setattr(self, f"{role}_kernel", kernel)
            setattr(self, f"{role}_bias", bias)
        if self.shared_query_key:
            self.key_kernel, self.key_bias = self.query_kernel, self.query_bias

    def features(self, x, projection_matrix=None, *, is_query):
        if self.query_kernel is None:
            raise ValueError(
                "Hedgehog has trainable weights: call `build(layer, num_heads, key_dim)` first "
                "(FavorAttention does it when it builds). Received: an unbuilt Hedgehog map"
            )
        kernel, bias = (
            (self.query_kernel, self.query_bias) if is_query else (self.key_kernel, self.key_bias)
        )
        u = ops.matmul(x, kernel)  # (B, N, L, H) @ (N, H, F') -> (B, N, L, F')
        if bias is not None:
            u = u + bias  # (N, 1, F')
        return ops.concatenate([ops.softmax(u, axis=-1), ops.softmax(-u, axis=-1)], axis=-1)

    def get_config(self):
        init = self.kernel_initializer
        return {
            "feature_dim": self.feature_dim,
            "shared_query_key": self.shared_query_key,
            "use_bias": self.use_bias,
            "kernel_initializer": init if isinstance(init, str) else initializers.serialize(init),
        }
