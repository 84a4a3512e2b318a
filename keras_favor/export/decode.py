"""Streaming-decode signatures: ``initial_state`` and ``decode_step``.

- ``initial_state``: input ``batch_size`` (int32 scalar), outputs the empty decoding state, one
  named tensor per state array (``state_0``, ``state_1``, ...).
- ``decode_step``: inputs the new token(s) of every sequence plus the state tensors, outputs the
  step's outputs plus the new state under the same state names, so a client feeds each step's
  state outputs back as the next step's inputs. Cost per token is constant.
"""

import keras

from keras_favor._checks import invalid
from keras_favor.export._signatures import (
    BATCH_SIZE_INPUT,
    DECODE_STEP,
    INITIAL_STATE,
    POSITION_INPUT,
    STATE_PREFIX,
    check_input_name,
    model_input_specs,
    model_output_names,
    name_outputs,
    tensor_spec,
    tf,
)


class DecodeSignatures:
    """How to export streaming decoding: an initial state and one decode step.

    `export_saved_model` builds this by itself for causal chain models of
    `FavorTransformerDecoder` blocks (`from_model`, on `keras_favor.layers.decode_step`); build one
    explicitly for anything else (e.g. around `FavorAttention.get_initial_state` / `step`).

    Args:
        initial_state_fn: ``batch_size`` (a Python int) -> state, a nested structure of tensors
            whose first axis is the batch (rank-0 entries are shared). It is called once with
            ``batch_size=1``; the ``initial_state`` signature broadcasts that state to the
            requested batch size (zeros are written as zeros, not stored).
        step_fn: ``(inputs, state) -> (outputs, new_state)``; ``inputs`` is a dict of tensors
            named as in `step_input_specs`; ``outputs`` a tensor, a list or a dict of tensors;
            ``new_state`` has the structure of ``state``.
        step_input_specs: dict, input name -> `keras.InputSpec` (or `tf.TensorSpec`) of one
            step's inputs, batch dimension None. Names must not start with ``state_``.
        output_names: names of the step's outputs when `step_fn` does not return a dict
            (default: the names of the model's outputs, else ``output_0``, ...).

    Example:

    >>> layer = model.get_layer("attention")  # a causal FavorAttention  # doctest: +SKIP
    >>> def step_fn(inputs, state):
    ...     x = inputs["tokens"]  # (B, E), one position
    ...     return layer.step(x, x, state)
    >>> decode = DecodeSignatures(  # doctest: +SKIP
    ...     layer.get_initial_state, step_fn,
    ...     {"tokens": keras.InputSpec(shape=(None, 16), dtype="float32")})
    >>> export_saved_model(model, "saved_models/my_model", decode=decode)  # doctest: +SKIP
    """

    def __init__(self, initial_state_fn, step_fn, step_input_specs, output_names=None):
        if not callable(initial_state_fn):
            raise invalid("initial_state_fn", "a callable", initial_state_fn)
        if not callable(step_fn):
            raise invalid("step_fn", "a callable", step_fn)
        if not isinstance(step_input_specs, dict) or not step_input_specs:
            raise invalid(
                "step_input_specs", "a non-empty dict, input name -> spec", step_input_specs
            )
        for name in step_input_specs:
            check_input_name(name, "step_input_specs")
            if name.startswith(STATE_PREFIX):
                raise invalid(
                    "step_input_specs",
                    f"input names that do not start with {STATE_PREFIX!r} (the state's names)",
                    name,
                )
        self.initial_state_fn = initial_state_fn
        self.step_fn = step_fn
        self.step_input_specs = dict(step_input_specs)
        self.output_names = None if output_names is None else list(output_names)

    def __repr__(self):
        return (
            f"DecodeSignatures(step_inputs={list(self.step_input_specs)}, "
            f"output_names={self.output_names})"
        )

    @classmethod
    def from_model(cls, model, strict=False):
        """Decode signatures of a causal chain model (see `keras_favor.layers.decode_plan`).

        The step runs `keras_favor.layers.decode_step` on one position. Its inputs are the
        model input's value at that position, under the model input's name (shape (B,) for
        token ids, (B, ...) for a (B, L, ...) input), and ``position`` (int32, (B,)): the index
        of that position in each sequence. Its outputs are the model's output at that position
        (e.g. logits (B, V)) under the model's output name, and the new state.

        Args:
            model: a `keras.Model`.
            strict: raise the `decode_plan` error if the model cannot be decoded (True), or
                return None (False).

        Returns:
            A `DecodeSignatures`, or None when `strict` is False and the model is not a causal
            chain with at least one `FavorTransformerDecoder`.
        """
        try:
            name, spec = _decodable_input(model)
        except ValueError:
            if strict:
                raise
            return None
        if name == POSITION_INPUT:
            raise invalid(
                "model",
                f"a model input not named {POSITION_INPUT!r} (the decode step's position input)",
                name,
            )
        from keras_favor.layers import streaming  # noqa: PLC0415

        step_specs = {
            name: keras.InputSpec(shape=(None,) + tuple(spec.shape[2:]), dtype=spec.dtype),
            POSITION_INPUT: keras.InputSpec(shape=(None,), dtype="int32"),
        }

        def initial_state_fn(batch_size):
            return streaming.initial_decode_state(model, batch_size)

        def step_fn(inputs, state):
            return streaming.decode_step(model, inputs[name], inputs[POSITION_INPUT], state)

        return cls(initial_state_fn, step_fn, step_specs, output_names=model_output_names(model))


def _decodable_input(model):
    """(name, spec) of a streamable model's input; a ValueError saying why it is not one."""
    from keras_favor.layers import FavorTransformerDecoder, streaming  # noqa: PLC0415

    layers = streaming.decode_plan(model)
    if not any(isinstance(layer, FavorTransformerDecoder) for layer in layers):
        raise invalid(
            "model",
            "a model with at least one `FavorTransformerDecoder` block for streaming decoding",
            model.name,
        )
    names, specs = model_input_specs(model)
    if len(names) != 1:
        raise invalid("model", "a model with one input for streaming decoding", names)
    return names[0], specs[0]


def add_decode_endpoints(archive, decode, output_names):
    """Adds the ``initial_state`` and ``decode_step`` endpoints of `decode` to an ExportArchive.

    Args:
        archive: a `keras.export.ExportArchive` tracking the model.
        decode: a `DecodeSignatures`.
        output_names: names of the step's outputs if `decode` gives none.
    """
    example_state = decode.initial_state_fn(1)
    state_flat = keras.tree.flatten(example_state)
    state_specs = {
        # Batch dimension dynamic; a rank-0 entry (e.g. a shared position) stays a scalar.
        name: tf().TensorSpec((None,) + tuple(t.shape[1:]) if len(t.shape) else (), t.dtype, name)
        for name, t in _state_names(state_flat).items()
    }
    step_specs = {
        name: tensor_spec(spec, name, "decode") for name, spec in decode.step_input_specs.items()
    }
    archive.add_endpoint(
        INITIAL_STATE,
        _initial_state_fn(state_specs, [keras.ops.convert_to_numpy(t) for t in state_flat]),
        input_signature=[tf().TensorSpec((), tf().int32, name=BATCH_SIZE_INPUT)],
    )
    step = _decode_step_fn(decode, example_state, list(state_specs), output_names)
    archive.add_endpoint(DECODE_STEP, step, input_signature=[step_specs, state_specs])


def _state_names(state_flat):
    return {f"{STATE_PREFIX}{i}": t for i, t in enumerate(state_flat)}


def _initial_state_fn(state_specs, example_flat):
    """The ``initial_state`` function: one sequence's state broadcast to ``batch_size`` in the
    graph (streaming APIs take a Python int batch size; the signature takes a tensor)."""

    def initial_state(batch_size):
        result = {}
        for (name, spec), value in zip(state_specs.items(), example_flat):
            if value.ndim == 0:
                result[name] = tf().constant(value)
                continue
            shape = tf().concat([tf().reshape(batch_size, (1,)), value.shape[1:]], axis=0)
            if value.any():
                result[name] = tf().broadcast_to(tf().constant(value[:1]), shape)
            else:
                result[name] = tf().zeros(shape, dtype=spec.dtype)
        return result

    return initial_state


def _decode_step_fn(decode, example_state, state_names, output_names):
    """The ``decode_step`` function: the step's named outputs plus the new state's tensors."""
    step_output_names = decode.output_names or output_names

    def decode_step(inputs, states):
        state = keras.tree.pack_sequence_as(example_state, [states[name] for name in state_names])
        outputs, new_state = decode.step_fn(inputs, state)
        result = name_outputs(outputs, step_output_names)
        clash = sorted(set(result) & set(state_names))
        if clash:
            raise invalid(
                "decode", f"step outputs not named like the state ({STATE_PREFIX}0, ...)", clash
            )
        new_flat = _state_names(keras.tree.flatten(new_state))
        if list(new_flat) != state_names:
            raise invalid(
                "decode",
                f"a step_fn returning a state of {len(state_names)} arrays, as initial_state_fn",
                f"{decode!r} returning {len(new_flat)} arrays",
            )
        result.update(new_flat)
        return result

    return decode_step
