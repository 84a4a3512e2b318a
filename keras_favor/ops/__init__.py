"""Pure FAVOR functions on `keras.ops`: random projections and linear attention."""

from keras_favor.ops.linear_attention import (
    DEFAULT_CHUNK_SIZE,
    decay_rates,
    favor_attention,
    favor_attention_step,
    favor_initial_state,
)
from keras_favor.ops.random_features import random_features_matrix

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "decay_rates",
    "favor_attention",
    "favor_attention_step",
    "favor_initial_state",
    "random_features_matrix",
]
