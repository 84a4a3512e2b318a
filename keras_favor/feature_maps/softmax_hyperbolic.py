"""Hyperbolic (cosh) positive random features of the softmax kernel."""

import keras
from keras import ops

from keras_favor.feature_maps.softmax_positive import SoftmaxPositive


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxHyperbolic(SoftmaxPositive):
    """Hyperbolic features: φ(x) = exp(−‖x‖²/2) [exp(ωᵀx), exp(−ωᵀx)] / √(2M), x = q·H^(-1/4).

    Uses each random direction twice (±ω), which is an antithetic pair: the estimator of the softmax
    kernel stays unbiased and positive and its variance is lower than the positive features' at the
    same M (at the cost of 2M features). The positive features' per-key term and logit bound hold
    for −ω as well. String name: ``"softmax_hyperbolic"``.

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794, Lemma 1 (cosh).
    """

    def output_dim(self, key_dim, num_random_features=None):
        return 2 * num_random_features

    def logits(self, x, w, params, *, is_query):
        u = super().logits(x, w, params, is_query=True)  # (B, N, L, M): ωᵀx
        u = ops.concatenate([u, -u], axis=-1)  # (B, N, L, 2M)
        return u if is_query else u + self.key_row_logits(x, w, params)
