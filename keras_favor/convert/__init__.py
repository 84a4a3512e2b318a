"""Converting trained softmax-attention models to FAVOR attention, and attention transfer."""

from keras_favor.convert.attention_transfer import attention_transfer
from keras_favor.convert.to_favor import to_favor

__all__ = ["attention_transfer", "to_favor"]
