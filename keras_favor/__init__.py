"""keras_favor: Performer (FAVOR+) attention for Keras 3 and TensorFlow."""

from keras_favor import callbacks, convert, feature_maps, layers, ops
from keras_favor.callbacks import RedrawRandomFeatures
from keras_favor.feature_maps import FeatureMap
from keras_favor.layers import (
    FavorAttention,
    FavorTransformerDecoder,
    FavorTransformerEncoder,
    PositionEmbedding,
    RotaryEmbedding,
    SinePositionEncoding,
    TokenAndPositionEmbedding,
    decode_step,
    initial_decode_state,
)

__version__ = "0.1.0"

__all__ = [
    "FavorAttention",
    "FavorTransformerDecoder",
    "FavorTransformerEncoder",
    "FeatureMap",
    "PositionEmbedding",
    "RedrawRandomFeatures",
    "RotaryEmbedding",
    "SinePositionEncoding",
    "TokenAndPositionEmbedding",
    "callbacks",
    "convert",
    "decode_step",
    "feature_maps",
    "initial_decode_state",
    "layers",
    "ops",
]
