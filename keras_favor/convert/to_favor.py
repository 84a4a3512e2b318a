"""to_favor: a copy of a trained softmax-attention model with FavorAttention in its place."""

import keras

from keras_favor._checks import invalid
from keras_favor.layers._favor_block import FavorBlockBase
from keras_favor.layers.favor_attention import FavorAttention

# The FavorAttention arguments that `to_favor` sets; the others come from the converted layer.
FAVOR_OPTIONS = (
    "feature_map",
    "num_random_features",
    "orthogonal",
    "row_norms",
    "causal_chunk_size",
    "seed",
    "local_window",
)
# MultiHeadAttention config entries that FavorAttention takes as they are.
_SHARED_CONFIG = (
    "name",
    "trainable",
    "dtype",
    "num_heads",
    "key_dim",
    "value_dim",
    "dropout",
    "use_bias",
    "output_shape",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


def _is_graph_model(layer):
    # Functional and Sequential models: the ones `keras.models.clone_model` rebuilds layer by layer.
    return isinstance(layer, keras.Model) and hasattr(layer, "_run_through_graph")


def _cannot(layer, reason):
    return ValueError(
        f"to_favor cannot convert layer '{layer.name}' ({type(layer).__name__}): {reason}"
    )


def _check_mha(layer):
    """Raises a ValueError unless `layer` maps onto a FavorAttention with the same call."""
    if type(layer) is not keras.layers.MultiHeadAttention:
        raise _cannot(
            layer,
            "it is a subclass of MultiHeadAttention whose attention to_favor does not know "
            "(only keras.layers.MultiHeadAttention itself is converted).",
        )
    config = layer.get_config()
    if config.get("use_gate"):
        raise _cannot(layer, "FavorAttention has no output gate (use_gate=True).")
    if config.get("attention_axes") not in (None, (1,), [1]):
        raise _cannot(
            layer,
            "FavorAttention attends over the sequence axis only. "
            f"Received: attention_axes={config['attention_axes']!r}",
        )
    if config.get("sliding_window") is not None:
        raise _cannot(
            layer,
            "a sliding window is a dense (T, S) mask, which linear attention cannot apply. "
            f"Received: sliding_window={config['sliding_window']!r}",
        )
    for node in layer._inbound_nodes:
        args, kwargs = node.arguments.args, node.arguments.kwargs
        for tensor in args[:3]:
            if tensor is not None and len(tensor.shape) != 3:
                raise _cannot(
                    layer,
                    "FavorAttention takes (batch, length, features) inputs. "
                    f"Received: an input of shape {tuple(tensor.shape)}",
                )
        if kwargs.get("return_attention_scores"):
            raise _cannot(
                layer,
                "linear attention never forms the attention matrix, so there are no scores to "
                "return. Received: return_attention_scores=True",
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and (len(mask.shape) != 3 or mask.shape[1] != 1):
            raise _cannot(
                layer,
                "linear attention cannot apply a dense (batch, T, S) attention_mask (only a "
                "(batch, 1, S) key padding mask; use use_causal_mask=True for causal masks). "
                f"Received: attention_mask.shape={tuple(mask.shape)}",
            )


def _is_softmax_attention(layer):
    # FavorAttention is excluded explicitly, should it ever subclass MultiHeadAttention.
    return isinstance(layer, keras.layers.MultiHeadAttention) and not isinstance(
        layer, FavorAttention
    )


def _check_convertible(model):
    for layer in model.layers:
        if _is_graph_model(layer):
            _check_convertible(layer)
        elif isinstance(layer, FavorAttention):
            continue
        elif _is_softmax_attention(layer):
            _check_mha(layer)
        elif not isinstance(layer, FavorBlockBase):
            nested = [
                sub.name
                for sub in layer._flatten_layers(include_self=False)
                if _is_softmax_attention(sub)
            ]
            if nested:
                raise _cannot(
                    layer,
                    f"it holds MultiHeadAttention layers {nested} inside, which to_favor cannot "
                    "rebuild (it converts MultiHeadAttention layers of functional models and "
                    "keras_favor blocks built with attention_type='softmax').",
                )


def _relative_paths(layer):
    """{path of the variable below `layer`: variable} for every variable of `layer`."""
    prefix = layer.path + "/"
    out = {}
    for variable in layer.weights:
        path = variable.path
        path = path[len(prefix) :] if path.startswith(prefix) else path.split("/", 1)[-1]
        out[path] = variable
    return out


def _copy_converted(old, new):
    """Copies `old`'s weights onto the same paths of `new` (which has only FAVOR ones besides)."""
    source, target = _relative_paths(old), _relative_paths(new)
    missing = sorted(set(source) - set(target))
    if missing:
        raise _cannot(old, f"its converted layer has no weights at {missing}.")
    for path, variable in source.items():
        target[path].assign(variable.numpy())  # a copy: no buffer shared with the original


def to_favor(model, **favor_attention_kwargs):
    """A copy of a functional Keras model with FAVOR attention in place of softmax attention.

    Every `keras.layers.MultiHeadAttention` becomes a `FavorAttention` with the same
    configuration, the same weights (query, key, value and output projections) and the same call
    arguments (`use_causal_mask`, query / value / key masks, Keras masks), and every
    `FavorTransformerEncoder` / `FavorTransformerDecoder` built with `attention_type="softmax"`
    becomes the same block with `attention_type="favor"` and the same weights. Every other layer
    is copied with its weights. The original model is not changed. Nested functional and
    sequential models are converted too.

    With a learnable feature map (`feature_map="hedgehog"`), train the new maps to mimic the
    softmax attention with `attention_transfer`; then fine-tune end to end with `fit` if needed.

    Args:
        model: a functional (or sequential) `keras.Model`, built.
        **favor_attention_kwargs: FAVOR options of the new attention layers: `feature_map`,
            `num_random_features`, `orthogonal`, `row_norms`, `causal_chunk_size`, `seed` and
            `local_window` (exact softmax over neighbours, the map beyond them; self-attention
            only) (see `FavorAttention`). An int `seed` gives the i-th converted layer (in the order
            of `model.layers`) the seed `seed + i`. Blocks keep their own options unless given.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: naming the layer and the reason, for a layer that cannot be converted: a
            subclass of `MultiHeadAttention`, a layer holding one inside, an `attention_mask` of
            shape (B, T, S), `return_attention_scores=True`, `use_gate`, a sliding window or
            attention over other axes. Also for a model that is not functional or sequential and
            for unknown keyword arguments.

    Example:

    >>> import keras
    >>> x = keras.Input((None, 16))
    >>> y = keras.layers.MultiHeadAttention(2, 8)(x, x, use_causal_mask=True)
    >>> favor = to_favor(keras.Model(x, y), feature_map="hedgehog", seed=0)
    >>> type(favor.layers[1]).__name__
    'FavorAttention'

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794, section 4.2.
    """
    if not _is_graph_model(model):
        raise invalid(
            "model",
            "a functional or sequential keras.Model (subclassed models cannot be rebuilt)",
            model,
        )
    unknown = sorted(set(favor_attention_kwargs) - set(FAVOR_OPTIONS))
    if unknown:
        raise ValueError(
            f"to_favor takes only the FAVOR options {list(FAVOR_OPTIONS)} as keyword arguments; "
            "the others come from the converted layers. "
            f"Received: {', '.join(f'{k}={favor_attention_kwargs[k]!r}' for k in unknown)}"
        )
    # Checks every option (with the messages FavorAttention gives).
    FavorAttention(num_heads=1, key_dim=1, name="to_favor_options", **favor_attention_kwargs)
    _check_convertible(model)
    seed = favor_attention_kwargs.get("seed")
    converted_count = [0]
    pairs = []

    def options():
        kwargs = dict(favor_attention_kwargs)
        if seed is not None:
            kwargs["seed"] = seed + converted_count[0]
        converted_count[0] += 1
        return kwargs

    def clone(layer):
        config = layer.get_config()
        if _is_softmax_attention(layer):
            shared = {k: config[k] for k in _SHARED_CONFIG if k in config}
            new = FavorAttention.from_config({**shared, **options()})
        elif isinstance(layer, FavorBlockBase) and layer.attention_type == "softmax":
            new = type(layer).from_config({**config, "attention_type": "favor", **options()})
        else:
            pairs.append((layer, layer.__class__.from_config(config), False))
            return pairs[-1][1]
        pairs.append((layer, new, True))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new, converted in pairs:
        if converted:
            _copy_converted(old, new)
        elif isinstance(old, keras.layers.Layer):  # not for operations (e.g. `x + y`)
            new.set_weights(old.get_weights())
    return new_model
