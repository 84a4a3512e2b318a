"""Learned position embeddings."""

import keras
from keras import ops

from keras_favor._checks import positive_int
from keras_favor.layers._positions import PositionLayer, position_indices


@keras.saving.register_keras_serializable(package="keras_favor")
class PositionEmbedding(PositionLayer):
    """A learned embedding per position, to be added to token embeddings.

    The layer holds a (sequence_length, E) table and returns the rows of the input's positions,
    shaped like the input, as keras-hub's `PositionEmbedding` does. Positions must stay below
    `sequence_length`, including while streaming.

    Args:
        sequence_length: the number of positions, a positive integer.
        initializer: initializer of the table. Defaults to `"glorot_uniform"`.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: (B, T, E) tensor; only its shape is used.
        start_index: the position of the first token: an int, or an integer tensor of shape
            () or (B,) (one offset per sequence, for streaming decoding). Defaults to 0.

    Returns:
        (B, T, E) embeddings in the layer's compute dtype.

    Example:

    >>> import numpy as np
    >>> x = np.zeros((2, 5, 8), "float32")
    >>> tuple(PositionEmbedding(sequence_length=16)(x).shape)
    (2, 5, 8)

    References:
        Devlin et al., BERT, arXiv 1810.04805 (learned absolute positions).
    """

    def __init__(self, sequence_length, initializer="glorot_uniform", **kwargs):
        positive_int(sequence_length, "sequence_length")
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.initializer = keras.initializers.get(initializer)
        self.supports_masking = True

    def build(self, inputs_shape):
        width = inputs_shape[-1]
        if width is None:
            raise ValueError(
                "The last dimension of the inputs of `PositionEmbedding` must be defined. "
                f"Received: inputs_shape={tuple(inputs_shape)}"
            )
        self.position_embeddings = self.add_weight(
            name="embeddings",
            shape=(self.sequence_length, width),
            initializer=self.initializer,
            trainable=True,
        )
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        length = inputs.shape[-2]
        if length is not None and isinstance(start_index, int):
            if start_index < 0 or start_index + length > self.sequence_length:
                raise ValueError(
                    f"Positions [{start_index}, {start_index + length}) do not fit in "
                    f"`sequence_length`={self.sequence_length}. Received: inputs.shape="
                    f"{tuple(inputs.shape)}, start_index={start_index}"
                )
        positions = position_indices(start_index, shape[-2])  # (1|B, T)
        embeddings = ops.take(self.position_embeddings, positions, axis=0)  # (1|B, T, E)
        return ops.broadcast_to(ops.cast(embeddings, self.compute_dtype), shape)

    def get_config(self):
        initializer = keras.initializers.serialize(self.initializer)
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "initializer": initializer,
        }
