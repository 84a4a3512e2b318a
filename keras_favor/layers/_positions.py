"""Shared pieces of the position layers: position indices and a shape-preserving base layer."""

import keras
from keras import ops


class PositionLayer(keras.layers.Layer):
    """Base of the position layers: the output has the input's shape and keeps its mask."""

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask


def position_indices(start_index, length):
    """Integer positions `start_index + [0, length)`: (1, L) for a scalar start, (B, L) for (B,).

    `start_index` may be a Python int or an integer tensor of shape () or (B,): one start per
    sequence, as when a batch of streams is decoded at different offsets.
    """
    steps = ops.arange(length, dtype="int32")  # (L,)
    start = ops.cast(ops.convert_to_tensor(start_index), "int32")
    if len(start.shape) == 0:
        return ops.expand_dims(steps + start, 0)  # (1, L)
    if len(start.shape) == 1:
        return ops.expand_dims(start, 1) + ops.expand_dims(steps, 0)  # (B, L)
    raise ValueError(
        "Argument `start_index` must be an integer or an integer tensor of shape () or (batch,). "
        f"Received: start_index.shape={tuple(start.shape)}"
    )
