"""keras_favor: Performer (FAVOR+) attention for Keras 3 and TensorFlow."""

from keras_favor import feature_maps, ops
from keras_favor.feature_maps import FeatureMap

__version__ = "0.1.0"

__all__ = ["FeatureMap", "feature_maps", "ops"]
