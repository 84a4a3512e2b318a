"""Rotary position embeddings (RoPE)."""

import keras
from keras import ops

from keras_favor._checks import invalid, is_int, positive_number
from keras_favor.layers._positions import PositionLayer, position_indices


def _axis(value, name):
    if not is_int(value):
        raise invalid(name, "an integer axis", value)
    return value


def apply_rotary_embedding(
    inputs,
    start_index=0,
    positions=None,
    *,
    max_wavelength=10000,
    scaling_factor=1.0,
    sequence_axis=1,
    feature_axis=-1,
):
    """The rotation of `RotaryEmbedding` as a function (same arguments, no layer)."""
    rank = len(inputs.shape)
    seq_axis, feat_axis = sequence_axis % rank, feature_axis % rank
    if seq_axis == feat_axis or seq_axis == 0:
        raise ValueError(
            "Arguments `sequence_axis` and `feature_axis` must name two different non-batch "
            f"axes. Received: sequence_axis={sequence_axis}, feature_axis={feature_axis} for "
            f"inputs of rank {rank}"
        )
    x = ops.moveaxis(inputs, (seq_axis, feat_axis), (1, -1))  # (B, T, ..., H)
    width = x.shape[-1]
    if width is None or width % 2:
        raise ValueError(
            "Rotary embeddings need an even, known number of features. "
            f"Received: inputs.shape={tuple(inputs.shape)}, feature_axis={feature_axis}"
        )
    half = width // 2
    if positions is None:
        positions = position_indices(start_index, ops.shape(x)[1])  # (1|B, T)
    else:
        positions = ops.convert_to_tensor(positions)
        if len(positions.shape) == 1:
            positions = ops.expand_dims(positions, 0)
    positions = ops.cast(positions, "float32") / float(scaling_factor)
    exponents = ops.arange(half, dtype="float32") * (2.0 / width)
    inverse_freq = ops.power(float(max_wavelength), -exponents)  # (H/2,)
    angles = ops.expand_dims(positions, -1) * inverse_freq  # (1|B, T, H/2)
    for _ in range(rank - 3):
        angles = ops.expand_dims(angles, 2)  # (1|B, T, 1, ..., H/2)
    cos, sin = ops.cos(angles), ops.sin(angles)
    xf = ops.cast(x, "float32")
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    rotated = ops.cast(rotated, inputs.dtype)
    return ops.moveaxis(rotated, (1, -1), (seq_axis, feat_axis))


@keras.saving.register_keras_serializable(package="keras_favor")
class RotaryEmbedding(PositionLayer):
    """Rotary position embeddings: rotates feature pairs by position-dependent angles.

    With H features split into halves (x₁, x₂), position p maps them to
    (x₁ cos θ − x₂ sin θ, x₂ cos θ + x₁ sin θ) with θᵢ = p / (scaling_factor ·
    max_wavelength^(2i/H)) (the "rotate half" layout of GPT-NeoX, LLaMA and keras-hub). Applied to
    queries and keys, it makes q·k depend on the positions only through their offset. Inside
    `FavorTransformerEncoder` / `FavorTransformerDecoder` it acts on the projected queries and keys
    before the feature map: a per-token rotation, so attention stays linear in length and a
    streaming decoder's state stays fixed-size.

    Args:
        max_wavelength: the base of the angle frequencies, a positive number. Defaults to 10000.
        scaling_factor: positions are divided by it (linear position interpolation), a positive
            number. Defaults to 1.0.
        sequence_axis: the axis of the inputs holding positions. Defaults to 1.
        feature_axis: the axis holding the (even number of) features. Defaults to -1.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a tensor such as (B, T, N, H) queries or keys.
        start_index: the first position, as in `PositionEmbedding` (int, or integer tensor of
            shape () or (B,)). Defaults to 0.
        positions: optional integer positions of shape (T,) or (B, T); they replace
            `start_index`.

    Returns:
        The rotated inputs, same shape and dtype.

    Example:

    >>> import numpy as np
    >>> q = np.random.randn(2, 6, 4, 8).astype("float32")  # (B, T, N, H)
    >>> tuple(RotaryEmbedding()(q).shape)
    (2, 6, 4, 8)

    References:
        Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding,
        arXiv 2104.09864.
    """

    def __init__(
        self, max_wavelength=10000, scaling_factor=1.0, sequence_axis=1, feature_axis=-1, **kwargs
    ):
        positive_number(max_wavelength, "max_wavelength")
        positive_number(scaling_factor, "scaling_factor")
        for name, axis in (("sequence_axis", sequence_axis), ("feature_axis", feature_axis)):
            _axis(axis, name)
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength
        self.scaling_factor = scaling_factor
        self.sequence_axis, self.feature_axis = sequence_axis, feature_axis
        self.supports_masking = True
        self.built = True

    def call(self, inputs, start_index=0, positions=None):
        return apply_rotary_embedding(
            inputs,
            start_index=start_index,
            positions=positions,
            max_wavelength=self.max_wavelength,
            scaling_factor=self.scaling_factor,
            sequence_axis=self.sequence_axis,
            feature_axis=self.feature_axis,
        )

    def get_config(self):
        names = ("max_wavelength", "scaling_factor", "sequence_axis", "feature_axis")
        return {**super().get_config(), **{name: getattr(self, name) for name in names}}
