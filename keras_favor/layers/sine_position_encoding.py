"""Fixed sinusoidal position encodings (Vaswani et al., 2017)."""

import keras
from keras import ops

from keras_favor._checks import positive_number
from keras_favor.layers._positions import PositionLayer, position_indices


@keras.saving.register_keras_serializable(package="keras_favor")
class SinePositionEncoding(PositionLayer):
    """Sinusoidal position encodings, to be added to token embeddings.

    Feature 2i holds sin(p / max_wavelength^(2i/E)) and feature 2i+1 holds cos of the same angle,
    for position p and width E. The layer returns the encodings only (shaped like its input), as
    keras-hub's `SinePositionEncoding` does; add them to the embeddings yourself. It has no
    weights and no length limit, so it serves any position a streaming decoder reaches.

    Args:
        max_wavelength: the longest wavelength of the sinusoids, a positive number. Defaults to
            10000.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: the (B, T, E) embeddings the encodings are for; only their shape is read.
        start_index: the first position, as in `PositionEmbedding` (int, or integer tensor of
            shape () or (B,)). Defaults to 0.

    Returns:
        The (B, T, E) encodings, in the compute dtype.

    Example:

    >>> import numpy as np
    >>> encodings = SinePositionEncoding()(np.zeros((2, 5, 8), "float32"))
    >>> tuple(encodings.shape)
    (2, 5, 8)

    References:
        Vaswani et al., Attention Is All You Need, arXiv 1706.03762.
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        positive_number(max_wavelength, "max_wavelength")
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength
        self.supports_masking = True
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        width = inputs.shape[-1]
        positions = ops.cast(position_indices(start_index, shape[-2]), "float32")  # (1|B, T)
        features = ops.arange(width, dtype="int32")
        exponents = ops.cast(2 * (features // 2), "float32") / float(width)
        timescales = ops.power(1.0 / float(self.max_wavelength), exponents)  # (E,)
        angles = ops.expand_dims(positions, -1) * timescales  # (1|B, T, E)
        is_cos = ops.cast(features % 2, "float32")
        encoding = ops.sin(angles) * (1.0 - is_cos) + ops.cos(angles) * is_cos
        return ops.broadcast_to(ops.cast(encoding, self.compute_dtype), shape)

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}
