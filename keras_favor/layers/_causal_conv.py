"""A short causal depthwise convolution over the sequence, with a streaming step.

Used by `FavorTransformerDecoder(causal_conv_kernel_size=k)` before the self-attention's query,
key and value projections: each position mixes its own input with the k − 1 previous ones, channel
by channel, which gives the block local order without absolute positions. The layer is internal
to the block, which rebuilds it from its own config.

Shape legend: B batch, L length, E model width, K kernel size.
"""

import keras
from keras import ops

from keras_favor._checks import invalid, is_int


def check_kernel_size(value, name="causal_conv_kernel_size"):
    """`value` if it is None or an int ≥ 2; else a ValueError."""
    if value is not None and (not is_int(value) or value < 2):
        raise invalid(name, "None or an integer ≥ 2 (positions, the current one included)", value)
    return value


def _last_is_one(shape, dtype=None):
    # The identity filter: a new block starts as one without the convolution.
    return ops.concatenate(
        [ops.zeros((shape[0] - 1, shape[1]), dtype=dtype), ops.ones((1, shape[1]), dtype=dtype)]
    )


class CausalDepthwiseConv1D(keras.layers.Layer):
    """y_t = Σ_j kernel[j] ⊙ x_(t−K+1+j) + bias over (B, L, E), positions before 0 being zeros.

    The kernel (K, E) starts as the identity (kernel[K−1] = 1, the rest 0). `call` takes an
    optional (B, L) padding mask: padded positions enter as zeros, so left and right padding
    equal truncation. `step` decodes one position with a fixed-size buffer of the K − 1 previous
    inputs, (B, K−1, E) in float32.
    """

    def __init__(self, kernel_size, **kwargs):
        super().__init__(**kwargs)
        check_kernel_size(kernel_size, "kernel_size")
        self.kernel_size = kernel_size
        # Positions keep their padding: a Keras mask on the input passes to the output.
        self.supports_masking = True

    def build(self, input_shape):
        width = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(self.kernel_size, width), initializer=_last_is_one
        )
        self.bias = self.add_weight(name="bias", shape=(width,), initializer="zeros")

    def call(self, inputs, padding_mask=None):
        x = inputs  # (B, L, E)
        if padding_mask is not None:
            x = x * ops.expand_dims(ops.cast(padding_mask, x.dtype), -1)
        size = self.kernel_size
        x = ops.pad(x, [[0, 0], [size - 1, 0], [0, 0]])  # (B, K−1+L, E)
        kernel = ops.cast(self.kernel, x.dtype)
        out = ops.cast(self.bias, x.dtype)
        for j in range(size):  # static slices: x_(t−K+1+j) for every t
            out = out + x[:, j : (j - size + 1) or None] * kernel[j]
        return out

    def get_initial_state(self, batch_size):
        """The empty buffer: float32 zeros (B, K−1, E) (inputs before position 0)."""
        return ops.zeros((batch_size, self.kernel_size - 1, self.kernel.shape[-1]), "float32")

    def step(self, inputs, state):
        """One position: inputs (B, E), state (B, K−1, E) -> (output (B, E), new state)."""
        window = ops.concatenate(
            [ops.cast(state, inputs.dtype), ops.expand_dims(inputs, 1)], axis=1
        )  # (B, K, E), oldest first
        out = ops.sum(window * ops.cast(self.kernel, inputs.dtype), axis=1)
        out = out + ops.cast(self.bias, inputs.dtype)
        return out, ops.cast(window[:, 1:], "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}
