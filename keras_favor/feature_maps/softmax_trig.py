"""Trigonometric (random Fourier) features of the softmax kernel: a baseline."""

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap, _scaled_projection, half_squared_norm


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxTrig(FeatureMap):
    """Trigonometric features: φ(x) = exp(‖x‖²/2) [sin(ωᵀx), cos(ωᵀx)] / √M, x = q·H^(-1/4).

    Unbiased for the softmax kernel, but the features take both signs: the normaliser can come
    close to zero or go negative and the attention output then blows up. Kept as the baseline the
    Performer paper compares against; prefer the positive maps for training. Keys are weighted by
    exp(‖y‖²/2), shifted by its maximum over real keys in non-causal mode; causal mode has no
    causal bound for it and uses no shift. String name: ``"softmax_trig"``.

    References:
        Rahimi and Recht, Random Features for Large-Scale Kernel Machines, NeurIPS 2007;
        Choromanski et al., arXiv 2009.14794, Section 2.3.
    """

    @property
    def uses_random_features(self):
        return True

    def output_dim(self, key_dim, num_random_features=None):
        return 2 * num_random_features

    def __call__(self, query, key, projection_matrix=None, *, causal=False, key_mask=None):
        w = _scaled_projection(projection_matrix, query.shape[-1])
        u_q = ops.matmul(query, ops.transpose(w))  # (B, N, T, M)
        u_k = ops.matmul(key, ops.transpose(w))  # (B, N, S, M)
        log_weight = half_squared_norm(key)  # (B, N, S, 1)
        if not causal:
            valid = (
                log_weight
                if key_mask is None
                else ops.where(key_mask > 0, log_weight, -float("inf"))
            )
            shift = ops.max(valid, axis=(2, 3), keepdims=True)
            log_weight = log_weight - ops.stop_gradient(ops.where(ops.isfinite(shift), shift, 0.0))
        weight = ops.exp(log_weight)
        q_feat = ops.concatenate([ops.sin(u_q), ops.cos(u_q)], axis=-1)
        k_feat = ops.concatenate([ops.sin(u_k), ops.cos(u_k)], axis=-1) * weight
        return q_feat, k_feat
