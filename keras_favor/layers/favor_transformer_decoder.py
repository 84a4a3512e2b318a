"""FavorTransformerDecoder: a causal Transformer decoder block with FAVOR attention."""

import keras
from keras import ops

from keras_favor._checks import boolean
from keras_favor.layers._causal_conv import CausalDepthwiseConv1D, check_kernel_size
from keras_favor.layers._favor_block import (
    CROSS_ATTENTION,
    CROSS_DROPOUT,
    FavorBlockBase,
    make_attention,
)
from keras_favor.layers._masks import merged_padding_mask
from keras_favor.ops.linear_attention import head_decay


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorTransformerDecoder(FavorBlockBase):
    """A Transformer decoder block with causal `FavorAttention`, streamable token by token.

    Causal self-attention, then (when built with an encoder sequence) cross-attention to the
    encoder outputs, then a feed-forward network; each with a residual connection, dropout and a
    layer norm (after the residual by default, before the sub-layer with `normalize_first=True`),
    as keras-hub's `TransformerDecoder`, with the same argument names. The causal self-attention
    is exact chunked FAVOR (time linear in length, no future token can leak), so the block can
    also decode one token at a time with a fixed-size state: `get_initial_state` and `step`
    (or `keras_favor.layers.initial_decode_state` / `decode_step` over a whole model).

    Whether the block has cross-attention is decided by the first call (or `build`): give
    `encoder_sequence` then and at every later call, or never.

    Args:
        intermediate_dim, num_heads, dropout, activation, layer_norm_epsilon,
        kernel_initializer, bias_initializer, normalize_first, feature_map,
        num_random_features, row_norms, orthogonal, rotary_max_wavelength: as in
            `FavorTransformerEncoder` (same defaults); `dropout` also drops on the
            cross-attention branch.
        causal_chunk_size: C, the chunk length of the exact chunked causal self-attention.
            Defaults to 128.
        use_rotary_embedding: apply rotary position embeddings (RoPE) to the projected queries
            and keys of the self-attention (not across sequences), before the feature map.
            Defaults to False.
        seed: None or a non-negative int. An int makes the random features and dropout masks
            reproducible; self- and cross-attention (and each dropout) get distinct seeds
            derived from it. Give each block of a model its own seed.
        attention_type: `"favor"` (default): `FavorAttention`, linear in length and streamable.
            `"softmax"`: exact `keras.layers.MultiHeadAttention` (quadratic in length, causal
            through `use_causal_mask`), with the same sub-layers and weights, so a softmax
            block's weights load into a FAVOR block; the FAVOR options are then unused,
            `dropout` drops attention probabilities (as in `MultiHeadAttention`), and there is
            no streaming decoding (`get_initial_state` and `step` raise a ValueError).
        local_window: None (default) or a positive int w: the self-attention is exact softmax
            over neighbours (|t − s| < w) and the feature map beyond them (see
            `FavorAttention`); needs `attention_type="favor"`.
        decay: a per-head decay of the causal self-attention's state (see `FavorAttention`):
            None (default), `"retnet"`, one number in (0, 1] or a list of `num_heads` of them.
            Needs `attention_type="favor"`; calling the block with `use_causal_mask=False`
            raises a ValueError.
        causal_conv_kernel_size: an int k ≥ 2 (default 4), or None for no convolution: a
            causal depthwise convolution over the last k positions (per channel, with a bias;
            it starts as the identity) mixes the self-attention's input before the query, key
            and value projections, which gives the block local order without absolute
            positions. Padded positions enter it as zeros (left and right padding equal
            truncation). Streaming keeps the last k − 1 inputs in the state. Configs saved
            without this key (earlier versions) load as blocks without a convolution.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        decoder_sequence: (B, T, E) sequence.
        encoder_sequence: optional (B, S, E_enc) encoder outputs for cross-attention.
        decoder_padding_mask: optional (B, T) mask, True (or 1) for real tokens; combined with
            the Keras mask of `decoder_sequence`. Padded tokens are removed from the keys.
        decoder_attention_mask: optional (B, 1, T) key padding mask of the self-attention,
            combined with `decoder_padding_mask`. A dense (B, T, T) mask raises a ValueError:
            FAVOR attention never forms the attention matrix (`attention_type="softmax"`
            applies it); causal masking is `use_causal_mask`.
        encoder_padding_mask: optional (B, S) mask of the encoder outputs; combined with the
            Keras mask of `encoder_sequence`.
        encoder_attention_mask: optional (B, 1, S) key padding mask of the cross-attention, with
            the same rule as `decoder_attention_mask`.
        use_causal_mask: causal self-attention (True, the default, as in keras-hub): position t
            attends to positions 0..t only. False gives bidirectional self-attention (and `step`
            does not apply to such a use).
        training: whether dropout is active.

    Returns:
        (B, T, E), carrying the decoder sequence's Keras mask.

    Example:

    >>> import numpy as np
    >>> decoder = FavorTransformerDecoder(intermediate_dim=32, num_heads=2,
    ...                                   num_random_features=16, seed=0)
    >>> x = np.random.rand(2, 10, 8).astype("float32")
    >>> y = decoder(x)
    >>> state = decoder.get_initial_state(batch_size=2)
    >>> out, state = decoder.step(x[:, 0], state, position=0)
    >>> bool(np.allclose(out, y[:, 0], atol=1e-5))
    True

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794.
        Vaswani et al., Attention Is All You Need, arXiv 1706.03762.
        Su et al., RoFormer (rotary position embeddings), arXiv 2104.09864.
    """

    def __init__(self, *args, decay=None, causal_conv_kernel_size=4, **kwargs):
        # Every other argument is the shared block's (`FavorBlockBase`), in its order.
        super().__init__(*args, **kwargs)
        head_decay(decay, self.num_heads)
        if decay is not None and self.attention_type != "favor":
            raise ValueError(
                "Argument `decay` (a decay of the causal FAVOR state) needs "
                "attention_type='favor': exact softmax attention has no state to decay. "
                f"Received: decay={decay!r}, attention_type={self.attention_type!r}"
            )
        check_kernel_size(causal_conv_kernel_size)
        self.decay = list(decay) if isinstance(decay, tuple) else decay
        self.causal_conv_kernel_size = causal_conv_kernel_size

    def get_config(self):
        return {
            **super().get_config(),
            "decay": self.decay,
            "causal_conv_kernel_size": self.causal_conv_kernel_size,
        }

    @classmethod
    def from_config(cls, config):
        # Configs saved before the convolution existed have no such key: their blocks had none.
        return super().from_config({"causal_conv_kernel_size": None, **config})

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        decoder_sequence_shape = tuple(decoder_sequence_shape)
        key_dim = self._build_self_attention(
            decoder_sequence_shape, "decoder_sequence", decay=self.decay
        )
        self._causal_conv = None
        if self.causal_conv_kernel_size is not None:
            self._causal_conv = CausalDepthwiseConv1D(
                self.causal_conv_kernel_size, dtype=self.dtype_policy, name="causal_conv"
            )
            self._causal_conv.build(decoder_sequence_shape)
        self._cross_attention_layer = None
        if encoder_sequence_shape is not None:
            encoder_sequence_shape = tuple(encoder_sequence_shape)
            if len(encoder_sequence_shape) != 3 or encoder_sequence_shape[-1] is None:
                raise ValueError(
                    "Argument `encoder_sequence` must have rank 3 (batch, length, features) with "
                    f"a known feature size. Received: encoder_sequence.shape="
                    f"{encoder_sequence_shape}"
                )
            # No RoPE across sequences: decoder and encoder positions are unrelated.
            self._cross_attention_layer = make_attention(
                self, key_dim, CROSS_ATTENTION, "cross_attention", rotary=False
            )
            self._cross_attention_layer.build(decoder_sequence_shape, encoder_sequence_shape)
            self._cross_attention_layer_norm = self._layer_norm(
                "cross_attention_layer_norm", decoder_sequence_shape
            )
            self._cross_attention_dropout = self._dropout_layer(
                "cross_attention_dropout", CROSS_DROPOUT
            )
        self._build_feedforward(decoder_sequence_shape)
        self.built = True

    @property
    def has_cross_attention(self):
        """Whether the block was built with an encoder sequence (None before it is built)."""
        if not self.built:
            return None
        return self._cross_attention_layer is not None

    def _check_encoder_sequence(self, encoder_sequence):
        has_cross = self._cross_attention_layer is not None
        if has_cross and encoder_sequence is None:
            raise ValueError(
                f"Layer '{self.name}' was built with cross-attention: pass `encoder_sequence` at "
                "every call. Received: encoder_sequence=None"
            )
        if not has_cross and encoder_sequence is not None:
            raise ValueError(
                f"Layer '{self.name}' was built without cross-attention (its first call had no "
                "`encoder_sequence`), so it cannot use one now. Received: encoder_sequence.shape="
                f"{tuple(encoder_sequence.shape)}"
            )

    def _cross_attend(self, x, encoder_sequence, query_mask, encoder_mask, training, mask=None):
        layers = (
            self._cross_attention_layer,
            self._cross_attention_layer_norm,
            self._cross_attention_dropout,
        )
        masks = (query_mask, encoder_mask, mask)
        return self._attention_sub_block(x, layers, encoder_sequence, masks, training)

    def call(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        decoder_attention_mask=None,
        encoder_padding_mask=None,
        encoder_attention_mask=None,
        use_causal_mask=True,
        training=None,
    ):
        self._check_encoder_sequence(encoder_sequence)
        boolean(use_causal_mask, "use_causal_mask")
        decoder_mask = merged_padding_mask(
            decoder_sequence, decoder_padding_mask, "decoder_padding_mask"
        )
        decoder_attention_mask = self._checked_attention_mask(
            decoder_attention_mask, "decoder_attention_mask", decoder_sequence
        )
        encoder_mask = None
        if encoder_sequence is not None:
            encoder_mask = merged_padding_mask(
                encoder_sequence, encoder_padding_mask, "encoder_padding_mask"
            )
            encoder_attention_mask = self._checked_attention_mask(
                encoder_attention_mask, "encoder_attention_mask", encoder_sequence
            )

        mix = None
        if self._causal_conv is not None:
            conv_mask = decoder_mask
            if decoder_attention_mask is not None:
                keys = ops.cast(decoder_attention_mask[:, 0], "bool")  # (B, T)
                conv_mask = keys if conv_mask is None else ops.logical_and(conv_mask, keys)

            def mix(h):
                return self._causal_conv(h, padding_mask=conv_mask)

        x = self._attention_sub_block(
            decoder_sequence,
            self._self_attention_layers(),
            None,
            (decoder_mask, decoder_mask, decoder_attention_mask),
            training,
            mix=mix,
            use_causal_mask=use_causal_mask,
        )
        if encoder_sequence is not None:
            x = self._cross_attend(
                x, encoder_sequence, decoder_mask, encoder_mask, training, encoder_attention_mask
            )
        return self._feedforward(x, training)

    # ----------------------------------------------------------------------------------------
    # Streaming decoding.

    def _require_built(self, method):
        if self.attention_type != "favor":
            raise ValueError(
                f"`{method}` (streaming decoding with a fixed-size state) needs "
                "attention_type='favor': exact softmax attention has no such state. Received: "
                f"attention_type={self.attention_type!r}"
            )
        if not self.built:
            raise ValueError(
                f"Layer '{self.name}' must be built before `{method}` (call it on a "
                "(batch, length, features) sequence first, or `build` it). Received: built=False"
            )

    def get_initial_state(self, batch_size):
        """The empty decoding state of the causal self-attention: (S, z), float32 zeros.

        S is (B, N, F, D) and z is (B, N, F), with N heads, D = E // N and F the number of
        features of the map (M for `"softmax_positive"`). With `local_window=w`, two more
        entries hold the window's last w keys (B, N, w, D) and values (B, N, w, D + 1). With
        `causal_conv_kernel_size=k`, a last entry holds the convolution's last k − 1 inputs,
        (B, k − 1, E). Their size does not depend on how many tokens are decoded.

        Args:
            batch_size: B, a positive int or a scalar integer tensor (e.g. inside a serving
                function, where the batch size is only known at run time).

        Returns:
            The tuple (S, z), then (K, V1) with a window, then conv_buffer with a convolution.
        """
        self._require_built("get_initial_state")
        state = tuple(self._self_attention_layer.get_initial_state(batch_size))
        if self._causal_conv is not None:
            state += (self._causal_conv.get_initial_state(batch_size),)
        return state

    def step(
        self,
        inputs,
        state,
        position=None,
        encoder_sequence=None,
        decoder_padding_mask=None,
        encoder_padding_mask=None,
        training=False,
    ):
        """Decodes one position: equal to the full causal call at that position.

        Args:
            inputs: (B, E), the block's input at the new position.
            state: the state from `get_initial_state` or the previous `step`.
            position: the index of the new position, an int or an integer tensor of shape () or
                (B,). Required with `use_rotary_embedding=True`; unused otherwise.
            encoder_sequence: (B, S, E_enc) encoder outputs, if the block has cross-attention.
            decoder_padding_mask: optional (B,) mask: False marks a padding token, which leaves
                the state unchanged (as padded keys are removed from the full call).
            encoder_padding_mask: optional (B, S) mask of the encoder outputs.
            training: whether dropout is active. Defaults to False.

        Returns:
            The pair (outputs (B, E) in the compute dtype, new state).
        """
        self._require_built("step")
        if len(inputs.shape) != 2:
            raise ValueError(
                "Argument `inputs` of `step` must have rank 2 (batch, features): one position. "
                f"Received: inputs.shape={tuple(inputs.shape)}"
            )
        self._check_encoder_sequence(encoder_sequence)
        if self.use_rotary_embedding and position is None:
            raise ValueError(
                "use_rotary_embedding=True: `step` needs the `position` of the decoded token. "
                "Received: position=None"
            )
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        attention = self._self_attention_layer
        old_state = tuple(state)
        size = attention.state_size
        expected = size + (self._causal_conv is not None)
        if len(old_state) != expected:
            raise ValueError(
                f"Argument `state` must be the {expected} arrays from `get_initial_state` or "
                f"`step` of this block. Received: a state of {len(old_state)} arrays"
            )
        new_state = None

        def attend(x):
            nonlocal new_state
            conv_state = ()
            if self._causal_conv is not None:
                x, buffer = self._causal_conv.step(x, old_state[size])
                conv_state = (buffer,)
            if self.use_rotary_embedding:
                out, attention_state = attention.step(x, x, old_state[:size], position=position)
            else:
                out, attention_state = attention.step(x, x, old_state[:size])
            new_state = tuple(attention_state) + conv_state
            return out

        x = self._residual(
            inputs, attend, self._self_attention_layer_norm, self._self_attention_dropout, training
        )
        if decoder_padding_mask is not None:
            keep = ops.cast(ops.convert_to_tensor(decoder_padding_mask), "bool")  # (B,)
            new_state = tuple(
                ops.where(ops.reshape(keep, (-1,) + (1,) * (len(new.shape) - 1)), new, old)
                for new, old in zip(new_state, old_state)
            )
        if encoder_sequence is not None:
            query_mask = None
            if decoder_padding_mask is not None:
                query_mask = ops.expand_dims(ops.cast(decoder_padding_mask, "bool"), 1)
            encoder_mask = merged_padding_mask(
                encoder_sequence, encoder_padding_mask, "encoder_padding_mask"
            )
            x = self._cross_attend(
                ops.expand_dims(x, 1), encoder_sequence, query_mask, encoder_mask, training
            )[:, 0]
        return self._feedforward(x, training), new_state
