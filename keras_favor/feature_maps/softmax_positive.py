"""FAVOR+ positive random features of the softmax kernel."""

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import (
    ExponentialFeatureMap,
    half_squared_norm,
    project,
)


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxPositive(ExponentialFeatureMap):
    """Positive random features: φ(x) = exp(ωᵀx − ‖x‖²/2) / √M with x = q·H^(-1/4).

    Unbiased for exp(qᵀk/√H) when every row of ω is marginally N(0, I) (orthogonal blocks with chi
    row norms keep that and lower the variance). All features are positive, so the normaliser is a
    sum of positive terms: the estimator stays stable where the trigonometric one does not.
    String name: ``"softmax_positive"`` (the default).

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794, Lemma 1.
    """

    low_precision_logits = True

    def logits(self, x, w, params, *, is_query):
        u = project(x, w)  # (B, N, L, M)
        return u if is_query else u + self.key_row_logits(x, w, params)

    def key_row_logits(self, x, w, params):
        return -half_squared_norm(x)  # (B, N, L, 1)

    def logit_bound(self, w, params):
        # ωᵀy − ‖y‖²/2 = ‖ω‖²/2 − ‖y − ω‖²/2 ≤ ‖ω‖²/2, and ‖ω‖² = ‖w‖²·√H.
        key_dim = w.shape[-1]
        return ops.max(ops.sum(ops.square(w), axis=-1)) * (0.5 * float(key_dim) ** 0.5)
