"""FAVOR++: optimal positive random features of the softmax kernel."""

import keras
from keras import ops

from keras_favor._checks import non_negative_number
from keras_favor.feature_maps.feature_map import (
    ExponentialFeatureMap,
    half_squared_norm,
    project,
)


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxOptimal(ExponentialFeatureMap):
    """FAVOR++ features: φ(x) = D·exp(A‖ω‖² + B ωᵀx − ‖x‖²/2) / √M, x = q·H^(-1/4).

    With B = √(1−4A) and D = (1−4A)^(H/4) the estimator is unbiased for every A < 1/8; the variance
    is smallest at A* = (1 − 2ρ − √((2ρ+1)² + 8ρ)) / 16 with ρ = φ̄/H and
    φ̄ = mean‖x‖² + mean‖y‖² + 2 x̄ᵀȳ over the queries x and the real keys y of each (batch, head).

    Args:
        rho: a fixed ρ. None (default): non-causal attention estimates ρ from the data of each
            (batch, head); causal attention, where the statistics may not use later tokens, uses
            ρ = 2/√H (unit-variance queries and keys), which keeps decoding state fixed-size. Give
            a value measured on your model's activations for the best variance in causal mode.

    String name: ``"softmax_optimal"``.

    References:
        Likhosherstov et al., Chefs' Random Tables: Non-Trigonometric Random Features,
        arXiv 2205.15317 (FAVOR++ / optimal positive random features).
    """

    low_precision_logits = True

    def __init__(self, rho=None):
        non_negative_number(rho, "rho", allow_none=True)
        self.rho = None if rho is None else float(rho)

    def get_config(self):
        return {"rho": self.rho}

    def parameters(self, query, key, w, *, causal, key_mask):
        key_dim = query.shape[-1]
        scale = float(key_dim) ** -0.5  # x = q·H^(-1/4): ‖x‖² = ‖q‖²·H^(-1/2)
        if self.rho is not None:
            rho = ops.convert_to_tensor(self.rho, "float32")
        elif causal:
            rho = ops.convert_to_tensor(2.0 * scale, "float32")
        else:
            mean_sq_x = ops.mean(ops.sum(ops.square(query), axis=-1), axis=-1) * scale  # (B, N)
            mean_x = ops.mean(query, axis=2)  # (B, N, H)
            if key_mask is None:
                mean_sq_y = ops.mean(ops.sum(ops.square(key), axis=-1), axis=-1) * scale
                mean_y = ops.mean(key, axis=2)
            else:
                count = ops.maximum(ops.sum(key_mask, axis=(2, 3)), 1.0)  # (B, 1)
                masked = key * key_mask
                mean_sq_y = ops.sum(ops.sum(ops.square(masked), axis=-1), axis=-1) / count * scale
                mean_y = ops.sum(masked, axis=2) / ops.expand_dims(count, -1)
            cross = ops.sum(mean_x * mean_y, axis=-1) * scale  # (B, N)
            phi_bar = mean_sq_x + mean_sq_y + 2.0 * cross
            rho = ops.maximum(phi_bar, 0.0) / float(key_dim)
            rho = ops.reshape(rho, (ops.shape(rho)[0], ops.shape(rho)[1], 1, 1))  # (B, N, 1, 1)
        a = (1.0 - 2.0 * rho - ops.sqrt(ops.square(2.0 * rho + 1.0) + 8.0 * rho)) / 16.0
        return ops.stop_gradient(a)

    def logits(self, x, w, params, *, is_query):
        a = params
        key_dim = w.shape[-1]
        b = ops.sqrt(1.0 - 4.0 * a)
        # (M,) = ‖ω‖², of the ω that the matmul uses (rounded to bfloat16 on the fast path)
        omega_sq = ops.sum(ops.square(ops.cast(w, "float32")), axis=-1) * float(key_dim) ** 0.5
        u = project(x, w)  # (B, N, L, M)
        logits = b * u + a * omega_sq
        return logits if is_query else logits + self.key_row_logits(x, w, params)

    def key_row_logits(self, x, w, params):
        return -half_squared_norm(x)  # (B, N, L, 1)

    def logit_bound(self, w, params):
        # A‖ω‖² + B ωᵀy − ‖y‖²/2 ≤ A‖ω‖² + B²‖ω‖²/2 = (1/2 − A)‖ω‖².
        key_dim = w.shape[-1]
        omega_sq_max = ops.max(ops.sum(ops.square(w), axis=-1)) * float(key_dim) ** 0.5
        return (0.5 - params) * omega_sq_max
