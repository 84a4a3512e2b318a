"""elu(x) + 1 features (the linear transformer's map)."""

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap


@keras.saving.register_keras_serializable(package="keras_favor")
class ELU(FeatureMap):
    """Deterministic features φ(x) = elu(x) + 1 (positive, H features, no random projection).

    String name: ``"elu"``.

    References:
        Katharopoulos et al., Transformers are RNNs, arXiv 2006.16236.
    """

    def features(self, x, projection_matrix=None, *, is_query):
        return ops.elu(x) + 1.0
