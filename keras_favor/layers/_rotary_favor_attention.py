"""FavorAttention with rotary position embeddings on the projected queries and keys.

Used by the Favor Transformer blocks when `use_rotary_embedding=True`. RoPE rotates each projected
query and key by an angle set by its own position, after the projections and before the feature
map: a per-token map, so attention stays linear in length and the decoding state fixed-size.

The rotation lives in the query and key projections (an `EinsumDense` that rotates its output),
so `FavorAttention.call` (masks, dropout, causal chunks) is reused unchanged; `step` takes the
position of the decoded token.
"""

import keras

from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.rotary_embedding import apply_rotary_embedding


class RotaryEinsumDense(keras.layers.EinsumDense):
    """An (B, L, E) -> (B, L, N, H) projection followed by a rotary embedding."""

    def __init__(self, *args, rotary_max_wavelength=10000, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary_max_wavelength = rotary_max_wavelength

    # A function, not a sub-layer: `Model.quantize` only quantizes leaf layers.
    def _rotate(self, outputs, start_index):
        return apply_rotary_embedding(
            outputs, start_index, max_wavelength=self.rotary_max_wavelength
        )  # (B, L, N, H)

    def call(self, inputs, training=None, start_index=0):
        return self._rotate(super().call(inputs, training=training), start_index)

    def quantized_call(self, inputs, training=None, start_index=0):
        return self._rotate(super().quantized_call(inputs, training=training), start_index)

    def quantize(self, mode=None, type_check=True, **kwargs):
        # The rotation adds no weights: quantize the projection as a plain EinsumDense (Keras
        # refuses subclasses unless they opt in).
        del type_check
        return super().quantize(mode, type_check=False, **kwargs)

    def get_config(self):
        return {**super().get_config(), "rotary_max_wavelength": self.rotary_max_wavelength}


class RotaryFavorAttention(FavorAttention):
    """`FavorAttention` whose projected queries and keys are rotated (RoPE) by position.

    Full calls use positions 0..L-1 (self-attention: queries and keys share positions); `step`
    takes the position of the token it decodes. Internal to the Favor Transformer blocks, which
    rebuild it from their own config.
    """

    def __init__(self, *args, rotary_max_wavelength=10000, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary_max_wavelength = rotary_max_wavelength

    def _projection(self, input_shape, heads_dim, name):
        dense = super()._projection(input_shape, heads_dim, name)
        if name not in ("query", "key"):
            return dense
        rotary = RotaryEinsumDense(
            rotary_max_wavelength=self.rotary_max_wavelength, **dense.get_config()
        )
        rotary.build(input_shape)
        return rotary

    def step(self, query, value, state, key=None, position=0):
        """`FavorAttention.step` with the new token's position: int or int tensor () or (B,)."""
        return self._step(query, value, state, key, start_index=position)

    def get_config(self):
        return {**super().get_config(), "rotary_max_wavelength": self.rotary_max_wavelength}
