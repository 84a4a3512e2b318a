"""Streaming (token-by-token) decoding of causal models built from Favor blocks.

A decoder-only model such as::

    tokens -> TokenAndPositionEmbedding -> FavorTransformerDecoder x L -> [LayerNorm] -> Dense

generates one token at a time with a fixed-size state per block: the causal FAVOR sums
S = Σ φ(k)vᵀ (B, N, F, D) and z = Σ φ(k) (B, N, F) of its self-attention, whatever the context
length. `decode_step` at position t equals the full causal forward at t.

The state is a list with one `(S, z)` pair of float32 tensors per `FavorTransformerDecoder`, in
model order (a triple `(S, z, conv_buffer)` for a block with `causal_conv_kernel_size`); every shape is fixed apart from the batch size, so a serving export needs two
functions: `initial_decode_state(model, batch_size)` and `decode_step(model, token, position,
state)` (state in, state out).
"""

import keras
from keras import ops

from keras_favor.layers.favor_transformer_decoder import FavorTransformerDecoder
from keras_favor.layers.token_and_position_embedding import TokenAndPositionEmbedding


def _position_wise_types():
    names = (
        "Dense",
        "LayerNormalization",
        "RMSNormalization",
        "UnitNormalization",
        "Dropout",
        "GaussianDropout",
        "GaussianNoise",
        "AlphaDropout",
        "Activation",
        "Softmax",
        "ReLU",
        "LeakyReLU",
        "ELU",
        "PReLU",
        "Identity",
    )
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


_POSITION_WISE = _position_wise_types()
_EMBEDDINGS = (TokenAndPositionEmbedding, keras.layers.Embedding)


def _chain_error(model, reason):
    return ValueError(
        "Streaming decoding needs a model that is a plain chain of layers: an optional "
        "`TokenAndPositionEmbedding` or `Embedding` first, then `FavorTransformerDecoder` blocks "
        "(without cross-attention) and position-wise layers (Dense, LayerNormalization, Dropout, "
        "Activation, ...), each feeding the next. For other models (subclassed models, layers "
        "shared with another model), pass the list of layers in order instead. "
        f"{reason} Received: model={getattr(model, 'name', model)!r}"
    )


def _model_layers(model):
    if isinstance(model, (list, tuple)):
        layers = list(model)
        for layer in layers:
            if not isinstance(layer, keras.layers.Layer):
                raise _chain_error(model, f"Item {layer!r} of the list is not a Keras layer.")
        return layers
    if not isinstance(model, keras.Model):
        raise _chain_error(model, f"Expected a keras.Model or a list of layers, not {type(model)}.")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(model, keras.Sequential):
        return layers
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise _chain_error(model, "The model has no symbolic inputs and outputs (subclassed?).")
    if len(inputs) != 1 or len(outputs) != 1:
        raise _chain_error(
            model, f"The model has {len(inputs)} inputs and {len(outputs)} outputs, not 1 and 1."
        )
    previous = inputs[0]
    for layer in layers:
        try:
            layer_input, layer_output = layer.input, layer.output
        except (AttributeError, ValueError) as error:
            raise _chain_error(
                model,
                f"Layer '{layer.name}' ({type(layer).__name__}) has no single input ({error}).",
            )
        if layer_input is not previous or isinstance(layer_output, (list, tuple, dict)):
            raise _chain_error(
                model,
                f"Layer '{layer.name}' ({type(layer).__name__}) does not take exactly the "
                "previous layer's output as its only input (branches, extra inputs such as "
                "explicit masks, or a layer first called in another model).",
            )
        previous = layer_output
    if outputs[0] is not previous:
        raise _chain_error(model, "The model's output is not the output of its last layer.")
    return layers


def _check_axes(layer, model):
    axis = getattr(layer, "axis", -1)
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if any(a not in (-1, 2) for a in axes):
        raise _chain_error(
            model,
            f"Layer '{layer.name}' ({type(layer).__name__}) acts on axis {axis}; only the last "
            "(feature) axis of a (batch, length, features) sequence keeps positions independent.",
        )


def decode_plan(model):
    """The layers of `model` in decoding order, checked for streaming decoding.

    Args:
        model: a Functional or Sequential `keras.Model` that is a chain of layers, or the list of
            its layers in order.

    Returns:
        The list of layers.

    Raises:
        ValueError: naming the first layer that cannot be decoded position by position.
    """
    layers = _model_layers(model)
    if not layers:
        raise _chain_error(model, "It has no layers.")
    for index, layer in enumerate(layers):
        if isinstance(layer, _EMBEDDINGS):
            if index != 0:
                raise _chain_error(
                    model, f"Embedding layer '{layer.name}' must come first (it is #{index})."
                )
        elif isinstance(layer, FavorTransformerDecoder):
            if not layer.built:
                raise _chain_error(
                    model, f"Block '{layer.name}' is not built: call the model once first."
                )
            if layer.attention_type != "favor":
                raise _chain_error(
                    model,
                    f"Block '{layer.name}' has attention_type={layer.attention_type!r}; only "
                    "'favor' blocks decode with a fixed-size state.",
                )
            if layer.has_cross_attention:
                raise _chain_error(
                    model,
                    f"Block '{layer.name}' has cross-attention; decode it with "
                    "`FavorTransformerDecoder.step(..., encoder_sequence=...)` instead.",
                )
        elif isinstance(layer, _POSITION_WISE):
            _check_axes(layer, model)
        else:
            raise _chain_error(
                model,
                f"Layer '{layer.name}' ({type(layer).__name__}) is not known to act on each "
                "position independently (or is a non-causal block).",
            )
    return layers


def _blocks(layers):
    return [layer for layer in layers if isinstance(layer, FavorTransformerDecoder)]


def initial_decode_state(model, batch_size):
    """The empty streaming state of a causal model: one (S, z) pair per decoder block
    (`(S, z, conv_buffer)` for a block with a causal convolution).

    Args:
        model: a chain model or list of layers (see `decode_plan`).
        batch_size: B, a positive int or a scalar integer tensor.

    Returns:
        A list, in model order, of `(S, z)` float32 zero tensors, S (B, N, F, D) and
        z (B, N, F) for each `FavorTransformerDecoder` (N heads, D = E // N, F features of the
        block's feature map), plus the (B, k − 1, E) buffer of a block's causal convolution of
        kernel size k. Its size does not grow with the number of decoded tokens.

    Example:

    >>> import keras
    >>> from keras_favor.layers import FavorTransformerDecoder, TokenAndPositionEmbedding
    >>> model = keras.Sequential([
    ...     keras.Input((None,), dtype="int32"),
    ...     TokenAndPositionEmbedding(50, 32, 8),
    ...     FavorTransformerDecoder(16, 2, num_random_features=16, seed=0),
    ...     keras.layers.Dense(50),
    ... ])
    >>> state = initial_decode_state(model, batch_size=2)
    >>> [tuple(t.shape) for t in state[0]]
    [(2, 2, 16, 4), (2, 2, 16), (2, 3, 8)]
    """
    return [block.get_initial_state(batch_size) for block in _blocks(decode_plan(model))]


def decode_step(model, token, position, state):
    """Runs `model` on one new position, carrying the causal state; equal to the full forward.

    Inference mode (dropout off). Token id 0 of an embedding with `mask_zero=True` is padding: it
    leaves that sequence's state unchanged (padded keys are removed from the full forward too), so
    left-padded prompts of different lengths decode together.

    Args:
        model: a chain model or list of layers (see `decode_plan`).
        token: (B,) integer token ids at the new position (or, for a model without an embedding
            layer, its (B, ...) input at that position).
        position: the index of the new position in its sequence: an int, or an integer tensor
            of shape () or (B,). It feeds the position embeddings (learned: must stay below their
            `sequence_length`; sinusoidal) and rotary embeddings.
        state: from `initial_decode_state` or the previous `decode_step`.

    Returns:
        `(outputs, new_state)`: the model's output at that position, (B, ...) without the
        length axis (e.g. logits (B, V)), and the state after it (same structure and shapes).

    Example:

    >>> import keras, numpy as np
    >>> from keras_favor.layers import (FavorTransformerDecoder,
    ...                                 TokenAndPositionEmbedding)
    >>> tokens = keras.Input((None,), dtype="int32")
    >>> x = TokenAndPositionEmbedding(50, 32, 8)(tokens)
    >>> x = FavorTransformerDecoder(16, 2, num_random_features=16, seed=0)(x)
    >>> model = keras.Model(tokens, keras.layers.Dense(50)(x))
    >>> ids = np.array([[3, 14, 15, 9]])
    >>> full = model(ids)
    >>> state = initial_decode_state(model, batch_size=1)
    >>> for t in range(4):
    ...     logits, state = decode_step(model, ids[:, t], t, state)
    >>> bool(np.allclose(logits, full[:, -1], atol=1e-5))
    True
    """
    layers = decode_plan(model)
    blocks = _blocks(layers)
    if not isinstance(state, (list, tuple)) or len(state) != len(blocks):
        raise ValueError(
            f"Argument `state` must be the list of {len(blocks)} block states from "
            "`initial_decode_state` or `decode_step` (one per FavorTransformerDecoder). "
            f"Received: state={type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else "")
        )
    token = ops.convert_to_tensor(token)
    x = ops.expand_dims(token, 1)  # (B, 1, ...)
    padding_mask = None
    new_state = []
    for layer in layers:
        if isinstance(layer, TokenAndPositionEmbedding):
            x = layer(x, start_index=position)  # (B, 1, E)
            if layer.mask_zero:
                padding_mask = ops.not_equal(token, 0)  # (B,)
        elif isinstance(layer, keras.layers.Embedding):
            x = layer(x)
            if layer.mask_zero:
                padding_mask = ops.not_equal(token, 0)
        elif isinstance(layer, FavorTransformerDecoder):
            out, block_state = layer.step(
                x[:, 0],
                state[len(new_state)],
                position=position,
                decoder_padding_mask=padding_mask,
            )
            new_state.append(block_state)
            x = ops.expand_dims(out, 1)
        else:
            x = layer(x, training=False)  # position-wise: (B, 1, ...) like any length
    return x[:, 0], new_state
