"""Keras implicit masks: reading and setting them, and merging them with explicit padding masks."""

from keras import ops

from keras_favor.ops.linear_attention import check_padding_mask

try:  # How Keras (and MultiHeadAttention) read and set implicit masks on every backend.
    from keras.src.backend import get_keras_mask, set_keras_mask
except ImportError:  # pragma: no cover - private API moved: fall back to the attribute.

    def get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x, mask):
        try:
            x._keras_mask = mask
        except AttributeError:  # e.g. JAX arrays take no attributes
            pass


def merged_padding_mask(sequence, explicit, name):
    """The key padding mask (B, L) of a (B, L, ...) input: its Keras mask AND `explicit` (a
    (B, L) mask passed as argument `name`, checked), or None when it has neither."""
    if explicit is not None:
        check_padding_mask(explicit, name, sequence.shape[0], sequence.shape[1])
        explicit = ops.cast(explicit, "bool")
    implicit = get_keras_mask(sequence)
    if implicit is None:
        return explicit
    implicit = ops.cast(implicit, "bool")
    return implicit if explicit is None else ops.logical_and(implicit, explicit)


def check_attention_mask(mask, name, batch, key_length):
    """Raises a ValueError naming `name` unless `mask` is a (batch, 1, key_length) key padding
    mask, the only `attention_mask` linear attention can apply; None dims match."""
    shape = tuple(mask.shape)
    if len(shape) == 3 and shape[1] == 1:
        if all(
            a is None or b is None or a == b for a, b in ((shape[0], batch), (shape[2], key_length))
        ):
            return
        expected = (
            f"a key padding mask of shape (batch, 1, key_length) = ({batch}, 1, {key_length})"
        )
    else:
        expected = (
            "a key padding mask of shape (batch, 1, key_length): linear attention never forms "
            "the (T, S) attention matrix, so it cannot mask individual query-key pairs; use "
            "padding masks for padding and `use_causal_mask=True` for causal attention"
        )
    raise ValueError(f"Argument `{name}` must be {expected}. Received: {name}.shape={shape}")
