"""FavorAttention with rotary position embeddings on the projected queries and keys.

Used by the Favor Transformer blocks when `use_rotary_embedding=True`. RoPE rotates each projected
query and key by an angle set by its own position, after the projections and before the feature
map: a per-token map, so attention stays linear in length and the decoding state fixed-size.

The rotation lives in the query and key projections (an `EinsumDense` that rotates its output),
so `FavorAttention.call` (masks, dropout, causal chunks) is reused unchanged; `step` takes the
position of the decoded token.
"""

import keras
from keras import ops

from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.rotary_embedding import apply_rotary_embedding
from keras_favor.ops.linear_attention import favor_attention_step


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
        key = value if key is None else key
        for name, x in (("query", query), ("value", value), ("key", key)):
            if len(x.shape) != 2:
                raise ValueError(
                    f"Argument `{name}` of `step` must have rank 2 (batch, features): one "
                    f"position. Received: {name}.shape={tuple(x.shape)}"
                )
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(
                "Argument `state` must be the pair (S, z) from `get_initial_state` or `step`. "
                f"Received: state={type(state).__name__}"
            )
        query = ops.convert_to_tensor(query, dtype=self.compute_dtype)
        value = ops.convert_to_tensor(value, dtype=self.compute_dtype)
        key = ops.convert_to_tensor(key, dtype=self.compute_dtype)
        if not self.built:
            self.build(
                (None, None, query.shape[-1]),
                (None, None, value.shape[-1]),
                (None, None, key.shape[-1]),
            )
        q = self.query_dense(ops.expand_dims(query, 1), start_index=position)[:, 0]  # (B, N, H)
        k = self.key_dense(ops.expand_dims(key, 1), start_index=position)[:, 0]  # (B, N, H)
        v = self.value_dense(ops.expand_dims(value, 1))[:, 0]  # (B, N, D)
        output, state = favor_attention_step(
            q, k, v, tuple(state), self.feature_map, self.projection_matrix
        )  # (B, N, D)
        output = self.output_dense(ops.expand_dims(output, 1))[:, 0]  # (B, E_out)
        return output, state

    def get_config(self):
        return {**super().get_config(), "rotary_max_wavelength": self.rotary_max_wavelength}
