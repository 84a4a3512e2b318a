"""SavedModel export in the TF Serving layout, with streaming-decode signatures.

TensorFlow is imported lazily, inside the functions, so that `import keras_favor` never needs it.

Signatures written by `export_saved_model`:

- ``serving_default``: the full forward pass. Inputs are named after the model's inputs, outputs
  after its outputs; batch and sequence length are dynamic (declare ``keras.Input(shape=(None,
  ...))``).
- ``initial_state`` (decoder models only): input ``batch_size`` (int32 scalar), outputs the empty
  decoding state, one named tensor per state array (``state_0``, ``state_1``, ...).
- ``decode_step`` (decoder models only): inputs the new token(s) of every sequence plus the state
  tensors, outputs the step's outputs plus the new state under the same state names, so a client
  feeds each step's state outputs back as the next step's inputs. Cost per token is constant.
"""

import os
import re
import shutil
import uuid

import keras

SERVING_DEFAULT = "serving_default"
INITIAL_STATE = "initial_state"
DECODE_STEP = "decode_step"
STATE_PREFIX = "state_"
BATCH_SIZE_INPUT = "batch_size"
POSITION_INPUT = "position"

# Op types that draw random numbers or orthogonalise: they belong at build / redraw time, never in
# an inference graph (results would change per request, and TFLite has no builtin for most).
_FORBIDDEN_OP = re.compile(
    r"Random|Multinomial|TruncatedNormal|^Rng|^StatefulUniform|^StatefulStandardNormal"
    r"|^NonDeterministicInts$|^Qr$|^Svd$"
)
_VALID_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-]*$")


def _tf():
    import tensorflow as tf  # noqa: PLC0415 (lazy: only export needs TensorFlow)

    return tf


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
            step's inputs, batch dimension None.
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
        if not callable(initial_state_fn) or not callable(step_fn):
            raise ValueError(
                "Arguments `initial_state_fn` and `step_fn` must be callables. Received: "
                f"initial_state_fn={initial_state_fn!r}, step_fn={step_fn!r}"
            )
        if not isinstance(step_input_specs, dict) or not step_input_specs:
            raise ValueError(
                "Argument `step_input_specs` must be a non-empty dict, input name -> spec. "
                f"Received: step_input_specs={step_input_specs!r}"
            )
        self.initial_state_fn = initial_state_fn
        self.step_fn = step_fn
        self.step_input_specs = dict(step_input_specs)
        self.output_names = None if output_names is None else list(output_names)

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
        from keras_favor.layers import FavorTransformerDecoder, streaming  # noqa: PLC0415

        try:
            layers = streaming.decode_plan(model)
            if not any(isinstance(layer, FavorTransformerDecoder) for layer in layers):
                raise ValueError(
                    "Streaming decoding needs at least one `FavorTransformerDecoder` block. "
                    f"Received: model={model.name!r}"
                )
            names, specs = _model_input_specs(model)
        except ValueError:
            if strict:
                raise
            return None
        (name,), (spec,) = names, specs
        if name == POSITION_INPUT:
            raise ValueError(
                f"The model input is named {POSITION_INPUT!r}, which the decode step uses for "
                "the position: rename the input."
            )
        step_specs = {
            name: keras.InputSpec(shape=(None,) + tuple(spec.shape[2:]), dtype=spec.dtype),
            POSITION_INPUT: keras.InputSpec(shape=(None,), dtype="int32"),
        }

        def initial_state_fn(batch_size):
            return streaming.initial_decode_state(model, batch_size)

        def step_fn(inputs, state):
            return streaming.decode_step(model, inputs[name], inputs[POSITION_INPUT], state)

        return cls(initial_state_fn, step_fn, step_specs, output_names=_output_names(model))


def _symbolic_inputs(model):
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


def _model_input_specs(model):
    """Names and specs (batch None) of a built model's inputs, flat, in call order."""
    struct = _symbolic_inputs(model) if isinstance(model, keras.Model) else None
    if struct is None:
        raise ValueError(
            f"Cannot read the inputs of model {getattr(model, 'name', model)!r} (a subclassed "
            "model has no symbolic inputs). Pass `input_signature`, a dict input name -> "
            "keras.InputSpec. Received: input_signature=None"
        )
    flat = keras.tree.flatten(struct)
    if isinstance(struct, dict) and len(struct) == len(flat):
        # keras.tree.flatten orders a dict by sorted key, not insertion: flatten the keys too.
        names = keras.tree.flatten({key: key for key in struct})
    else:
        names = [t.name for t in flat]
    specs = [keras.InputSpec(shape=(None,) + tuple(t.shape[1:]), dtype=t.dtype) for t in flat]
    return names, specs


def _output_names(model):
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    if isinstance(model, keras.Sequential) and model.layers:
        return [model.layers[-1].name]
    return None


def _check_name(name, what):
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        raise ValueError(
            f"Invalid {what} name {name!r}: signature names must match "
            f"{_VALID_NAME.pattern} (letters, digits, '_', '.', '-')."
        )


def _tensor_spec(spec, name):
    tf = _tf()
    if isinstance(spec, tf.TensorSpec):
        return tf.TensorSpec(spec.shape, spec.dtype, name=name)
    if isinstance(spec, keras.InputSpec):
        return tf.TensorSpec(spec.shape, spec.dtype or "float32", name=name)
    raise ValueError(
        f"Input `{name}`: expected a keras.InputSpec or tf.TensorSpec. Received: {spec!r}"
    )


def _sanitize(name):
    # Layer names such as "_private" or "dense/1" are not valid signature keys.
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).lstrip("_-")
    return name or "output"


def _name_outputs(outputs, names, what):
    """Turns a tensor, list or dict of outputs into a dict name -> tensor."""
    if isinstance(outputs, dict):
        items = list(outputs.items())
    else:
        flat = keras.tree.flatten(outputs)
        if names is None or len(names) != len(flat):
            names = [f"output_{i}" for i in range(len(flat))]
        items = list(zip(names, flat))
    result = {_sanitize(name): tensor for name, tensor in items}
    if len(result) != len(items):
        raise ValueError(
            f"Two {what}s have the same name once made valid signature keys: "
            f"{[name for name, _ in items]}. Pass `output_names`."
        )
    return result


def _flatten_state(state):
    flat = keras.tree.flatten(state)
    return {f"{STATE_PREFIX}{i}": t for i, t in enumerate(flat)}


def export_saved_model(
    model,
    base_path,
    version=1,
    *,
    input_signature=None,
    output_names=None,
    decode="auto",
    overwrite=False,
    verbose=False,
):
    """Exports a Keras model as a SavedModel in the TF Serving layout ``<base_path>/<version>/``.

    Written with `keras.export.ExportArchive` (a `tf.saved_model.save` of a Keras 3 model does not
    load in TF Serving's C++ loader). The version directory appears atomically (written under a
    temporary name, checked, then renamed), so a server watching `base_path` never loads a
    half-written model. The graph is checked to hold no random or QR ops (`check_inference_ops`).

    Args:
        model: a built `keras.Model`. Functional models give their inputs' names and shapes;
            declare sequence axes as None for a dynamic length.
        base_path: the model's base directory (what `tensorflow_model_server --model_base_path`
            points to).
        version: a positive int, the version directory name.
        input_signature: dict input name -> `keras.InputSpec` overriding the model's inputs
            (required for subclassed models); the model is then called with that dict (or the
            single tensor, if there is one input).
        output_names: names of the outputs when the model does not return a dict (default: the
            model's output layer names, else ``output_0``, ...).
        decode: ``"auto"`` adds ``initial_state`` and ``decode_step`` signatures when the model
            is a causal chain of `FavorTransformerDecoder` blocks that `decode_step` can stream
            (`DecodeSignatures.from_model`); ``True`` requires them (raising the reason if the
            model cannot be streamed); ``None`` adds none; a `DecodeSignatures` adds those.
        overwrite: replace an existing version directory (TF Serving versions are meant to be
            immutable, so the default refuses).
        verbose: print the endpoints.

    Returns:
        The path of the version directory, a str.

    Example:

    >>> inputs = keras.Input((None, 16), name="tokens")
    >>> model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(inputs))
    >>> path = export_saved_model(model, "saved_models/my_model", version=1)  # doctest: +SKIP
    >>> # tensorflow_model_server --model_name=my_model \\
    >>> #     --model_base_path="$PWD/saved_models/my_model" --rest_api_port=8501
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "keras_favor.export writes TensorFlow graphs and needs the TensorFlow backend: set "
            "KERAS_BACKEND=tensorflow (weights saved as .keras from any backend load there). "
            f"Received: backend={keras.backend.backend()!r}"
        )
    tf = _tf()
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError(
            "Received an invalid value for argument `version`, expected a positive integer. "
            f"Received: version={version!r}"
        )
    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a keras.Model. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            f"Argument `model` must be built before export. Received: model={model.name!r} "
            "(not built)"
        )
    if decode is True or (isinstance(decode, str) and decode == "auto"):
        decode = DecodeSignatures.from_model(model, strict=decode is True)
    elif decode is not None and not isinstance(decode, DecodeSignatures):
        raise ValueError(
            "Received an invalid value for argument `decode`, expected 'auto', True, None or a "
            f"DecodeSignatures. Received: decode={decode!r}"
        )
    base_path = os.fspath(base_path)
    final_dir = os.path.join(base_path, str(version))
    if os.path.exists(final_dir) and not overwrite:
        raise ValueError(
            f"Version directory {final_dir!r} exists already; TF Serving versions are immutable. "
            f"Pass a new `version` or overwrite=True. Received: version={version}"
        )

    if input_signature is None:
        names, specs = _model_input_specs(model)
        as_dict = isinstance(_symbolic_inputs(model), dict)
    else:
        if not isinstance(input_signature, dict) or not input_signature:
            raise ValueError(
                "Argument `input_signature` must be a non-empty dict, input name -> "
                f"keras.InputSpec. Received: input_signature={input_signature!r}"
            )
        names, specs = list(input_signature), list(input_signature.values())
        as_dict = len(names) > 1
    for name in names:
        _check_name(name, "input")
    serving_specs = {name: _tensor_spec(spec, name) for name, spec in zip(names, specs)}
    if output_names is None:
        output_names = _output_names(model)

    def serve(inputs):
        if as_dict:
            args = inputs
        elif len(names) == 1:
            args = inputs[names[0]]
        else:
            args = [inputs[name] for name in names]
        return _name_outputs(model(args, training=False), output_names, "output")

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_DEFAULT, serve, input_signature=[serving_specs])

    if decode is not None:
        step_names = list(decode.step_input_specs)
        for name in step_names:
            _check_name(name, "decode-step input")
            if name.startswith(STATE_PREFIX):
                raise ValueError(
                    f"Decode-step input {name!r} clashes with the state names "
                    f"({STATE_PREFIX}0, ...): rename it."
                )
        example_state = decode.initial_state_fn(1)
        state_flat = keras.tree.flatten(example_state)
        state_specs = {
            # Batch dimension dynamic; a rank-0 entry (e.g. a shared position) stays a scalar.
            f"{STATE_PREFIX}{i}": tf.TensorSpec(
                (None,) + tuple(t.shape[1:]) if len(t.shape) else (),
                t.dtype,
                name=f"{STATE_PREFIX}{i}",
            )
            for i, t in enumerate(state_flat)
        }
        step_specs = {
            name: _tensor_spec(spec, name) for name, spec in decode.step_input_specs.items()
        }
        step_output_names = decode.output_names or output_names

        # The state of one sequence, broadcast to the requested batch size inside the graph
        # (streaming APIs take a Python int batch size; the signature takes a tensor).
        example_flat = [keras.ops.convert_to_numpy(t) for t in state_flat]

        def initial_state(batch_size):
            result = {}
            for (name, spec), value in zip(state_specs.items(), example_flat):
                if value.ndim == 0:
                    result[name] = tf.constant(value)
                    continue
                shape = tf.concat([tf.reshape(batch_size, (1,)), value.shape[1:]], axis=0)
                if not value.any():
                    result[name] = tf.zeros(shape, dtype=spec.dtype)
                else:
                    result[name] = tf.broadcast_to(tf.constant(value[:1]), shape)
            return result

        def decode_step(inputs, states):
            state = keras.tree.pack_sequence_as(
                example_state, [states[name] for name in state_specs]
            )
            outputs, new_state = decode.step_fn(inputs, state)
            result = _name_outputs(outputs, step_output_names, "decode-step output")
            clash = set(result) & set(state_specs)
            if clash:
                raise ValueError(
                    f"Decode-step outputs {sorted(clash)} clash with the state names: rename them."
                )
            new_flat = _flatten_state(new_state)
            if list(new_flat) != list(state_specs):
                raise ValueError(
                    "The decode step returned a state with a different structure: "
                    f"{len(new_flat)} arrays instead of {len(state_specs)}."
                )
            result.update(new_flat)
            return result

        archive.add_endpoint(
            INITIAL_STATE,
            initial_state,
            input_signature=[tf.TensorSpec((), tf.int32, name=BATCH_SIZE_INPUT)],
        )
        archive.add_endpoint(DECODE_STEP, decode_step, input_signature=[step_specs, state_specs])

    os.makedirs(base_path, exist_ok=True)
    # A non-numeric name: TF Serving ignores it while it is being written.
    tmp_dir = os.path.join(base_path, f".tmp-{version}-{uuid.uuid4().hex}")
    try:
        archive.write_out(tmp_dir, verbose=verbose)
        check_inference_ops(tmp_dir)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
    return final_dir


def _read_saved_model_proto(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: PLC0415 (lazy)

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(os.fspath(saved_model_dir), "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def saved_model_signature_names(saved_model_dir):
    """Sorted signature keys of a SavedModel (read from saved_model.pb, nothing loaded).

    Internal keys such as ``__saved_model_init_op`` are left out.
    """
    proto = _read_saved_model_proto(saved_model_dir)
    keys = {key for graph in proto.meta_graphs for key in graph.signature_def}
    return sorted(key for key in keys if not key.startswith("__"))


def saved_model_op_types(saved_model_dir):
    """Every op type in a SavedModel: op type -> sorted names of the graphs/functions using it."""
    proto = _read_saved_model_proto(saved_model_dir)
    found = {}
    for meta_graph in proto.meta_graphs:
        for node in meta_graph.graph_def.node:
            found.setdefault(node.op, set()).add("<main graph>")
        for function in meta_graph.graph_def.library.function:
            for node in function.node_def:
                found.setdefault(node.op, set()).add(function.signature.name)
    return {op: sorted(where) for op, where in sorted(found.items())}


def check_inference_ops(saved_model_dir):
    """Raises ValueError if the SavedModel's graph holds random or QR ops.

    Walks the main graph and the graph of every function (all signatures, and whatever they
    call). Random draws and QR belong at build / redraw time: in an inference graph they make
    answers change per request and they have no TFLite builtin.

    Args:
        saved_model_dir: a SavedModel directory.

    Returns:
        The dict of `saved_model_op_types`, when no forbidden op is found.
    """
    op_types = saved_model_op_types(saved_model_dir)
    bad = {op: where for op, where in op_types.items() if _FORBIDDEN_OP.search(op)}
    if bad:
        details = "; ".join(f"{op} (in {', '.join(where)})" for op, where in bad.items())
        raise ValueError(
            "The exported graph holds random or QR ops, which must not run at inference (draw "
            "random features at build or redraw time and store them in a variable): "
            f"{details}. Received: saved_model_dir={os.fspath(saved_model_dir)!r}"
        )
    return op_types
