"""Attention layers with rotary position embeddings (RoPE) on the projected queries and keys.

Used by the Favor Transformer blocks when `use_rotary_embedding=True`. RoPE rotates each projected
query and key by an angle set by its own position, after the projections and before the attention
(for FAVOR, before the feature map): a per-token map, so FAVOR attention stays linear in length
and its decoding state fixed-size. Both layers override only the attention computation
(`_compute_attention`, and `_compute_step` for FAVOR decoding), so masks, dropout and causal
chunks are those of the parent; they are internal to the blocks, which rebuild them from their
own config.
"""

import keras

from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.rotary_embedding import apply_rotary_embedding


class _RotaryQueriesAndKeys:
    """Mixin: rotates the projected (B, L, N, H) queries and keys by their positions."""

    def __init__(self, *args, rotary_max_wavelength=10000, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary_max_wavelength = rotary_max_wavelength

    def _rotate(self, x, start_index=0):
        return apply_rotary_embedding(x, start_index, max_wavelength=self.rotary_max_wavelength)

    def _compute_attention(self, query, key, value, *args, **kwargs):
        # Full calls: positions 0..L-1 for queries and keys alike (self-attention).
        return super()._compute_attention(
            self._rotate(query), self._rotate(key), value, *args, **kwargs
        )

    def get_config(self):
        return {**super().get_config(), "rotary_max_wavelength": self.rotary_max_wavelength}


class RotaryMultiHeadAttention(_RotaryQueriesAndKeys, keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with RoPE: the exact counterpart of
    `RotaryFavorAttention`, with the same weights."""


class RotaryFavorAttention(_RotaryQueriesAndKeys, FavorAttention):
    """`FavorAttention` with RoPE; `step` takes the position of the token it decodes."""

    def step(self, query, value, state, key=None, position=0):
        """`FavorAttention.step` with the new token's position: int or int tensor () or (B,)."""
        return self._step(query, value, state, key, start_index=position)

    def _compute_step(self, query, key, value, state, start_index=0):
        return super()._compute_step(
            self._rotate(query, start_index), self._rotate(key, start_index), value, state
        )
