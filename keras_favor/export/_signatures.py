"""Signature names, and the names and specs of a model's inputs and outputs as signature keys.

Shared by the ``serving_default`` / ``serve`` endpoints and the decode endpoints.
"""

import re

import keras

from keras_favor._checks import invalid

SERVING_DEFAULT = "serving_default"
SERVE = "serve"
INITIAL_STATE = "initial_state"
DECODE_STEP = "decode_step"
STATE_PREFIX = "state_"
BATCH_SIZE_INPUT = "batch_size"
POSITION_INPUT = "position"

_VALID_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-]*$")


def tf():
    """The `tensorflow` module, imported on first use (only export needs TensorFlow)."""
    import tensorflow  # noqa: PLC0415

    return tensorflow


def symbolic_inputs(model):
    """The model's input structure (Functional: as declared; Sequential: its input), or None."""
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return struct
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return inputs[0] if len(inputs) == 1 else list(inputs)


def model_input_specs(model):
    """Names and `keras.InputSpec`s (batch None) of a built model's inputs, flat, in call order."""
    struct = symbolic_inputs(model) if isinstance(model, keras.Model) else None
    if struct is None:
        raise invalid(
            "input_signature",
            "a dict input name -> keras.InputSpec for model "
            f"{getattr(model, 'name', model)!r}, which has no symbolic inputs (a subclassed model)",
            None,
        )
    flat = keras.tree.flatten(struct)
    if isinstance(struct, dict) and len(struct) == len(flat):
        # keras.tree.flatten orders a dict by sorted key, not insertion: flatten the keys too.
        names = keras.tree.flatten({key: key for key in struct})
    else:
        names = [t.name for t in flat]
    specs = [keras.InputSpec(shape=(None,) + tuple(t.shape[1:]), dtype=t.dtype) for t in flat]
    return names, specs


def model_output_names(model):
    """The names of a model's outputs (Functional: its output layers), or None."""
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    if isinstance(model, keras.Sequential) and model.layers:
        return [model.layers[-1].name]
    return None


def check_input_name(name, argument):
    """`name` if it is a valid signature key; else a ValueError naming `argument`."""
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        raise invalid(
            argument,
            f"input names that are valid signature keys (matching {_VALID_NAME.pattern}: letters, "
            "digits, '_', '.', '-')",
            name,
        )
    return name


def tensor_spec(spec, name, argument):
    """A named `tf.TensorSpec` from a `keras.InputSpec` or `tf.TensorSpec`."""
    if isinstance(spec, tf().TensorSpec):
        return tf().TensorSpec(spec.shape, spec.dtype, name=name)
    if isinstance(spec, keras.InputSpec):
        return tf().TensorSpec(spec.shape, spec.dtype or "float32", name=name)
    raise invalid(argument, f"a keras.InputSpec or tf.TensorSpec for input {name!r}", spec)


def _sanitize(name):
    # Layer names such as "_private" or "dense/1" are not valid signature keys.
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).lstrip("_-")
    return name or "output"


def name_outputs(outputs, names):
    """Turns a tensor, list or dict of outputs into a dict signature key -> tensor.

    Args:
        outputs: what the model (or decode step) returned.
        names: names for non-dict outputs, used when there are as many as outputs (else
            ``output_0``, ``output_1``, ...).
    """
    if isinstance(outputs, dict):
        items = list(outputs.items())
    else:
        flat = keras.tree.flatten(outputs)
        if names is None or len(names) != len(flat):
            names = [f"output_{i}" for i in range(len(flat))]
        items = list(zip(names, flat))
    result = {_sanitize(name): tensor for name, tensor in items}
    if len(result) != len(items):
        raise invalid(
            "output_names",
            "output names that stay distinct once made valid signature keys",
            [name for name, _ in items],
        )
    return result
