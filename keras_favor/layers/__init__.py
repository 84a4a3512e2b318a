"""Keras layers built on FAVOR attention."""

from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.favor_transformer_decoder import FavorTransformerDecoder
from keras_favor.layers.favor_transformer_encoder import FavorTransformerEncoder
from keras_favor.layers.position_embedding import PositionEmbedding
from keras_favor.layers.rotary_embedding import RotaryEmbedding
from keras_favor.layers.sine_position_encoding import SinePositionEncoding
from keras_favor.layers.streaming import decode_plan, decode_step, initial_decode_state
from keras_favor.layers.token_and_position_embedding import TokenAndPositionEmbedding

__all__ = [
    "FavorAttention",
    "FavorTransformerDecoder",
    "FavorTransformerEncoder",
    "PositionEmbedding",
    "RotaryEmbedding",
    "SinePositionEncoding",
    "TokenAndPositionEmbedding",
    "decode_plan",
    "decode_step",
    "initial_decode_state",
]
