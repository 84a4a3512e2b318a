"""ReLU features (generalized attention)."""

import keras
from keras import ops

from keras_favor._checks import boolean, non_negative_number
from keras_favor.feature_maps.feature_map import FeatureMap, _scaled_projection


@keras.saving.register_keras_serializable(package="keras_favor")
class ReLU(FeatureMap):
    """ReLU features: φ(x) = relu(ωᵀx·H^(-1/4)) + ε with random features, or relu(x) + ε without.

    Not an estimator of softmax: "generalized attention" with a kernel of its own, which the
    Performer paper found competitive. Deterministic when `random_features=False` (then attention
    equals the explicit quadratic computation with this kernel exactly).

    Args:
        random_features: project with ω (M features) or use x itself (H features).
        epsilon: a small positive constant that keeps the normaliser away from zero.

    String name: ``"relu"`` (with random features).

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794, Section 2.2.
    """

    def __init__(self, random_features=True, epsilon=1e-3):
        boolean(random_features, "random_features")
        non_negative_number(epsilon, "epsilon")
        self.random_features = random_features
        self.epsilon = float(epsilon)

    @property
    def uses_random_features(self):
        return self.random_features

    def output_dim(self, key_dim, num_random_features=None):
        return num_random_features if self.random_features else key_dim

    def features(self, x, projection_matrix=None, *, is_query):
        if self.random_features:
            x = ops.matmul(x, ops.transpose(_scaled_projection(projection_matrix, x.shape[-1])))
        return ops.relu(x) + self.epsilon

    def get_config(self):
        return {"random_features": self.random_features, "epsilon": self.epsilon}
