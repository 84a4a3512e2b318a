"""SavedModel export in the TF Serving layout, with streaming-decode signatures.

TensorFlow is imported lazily, inside the functions, so that `import keras_favor` never needs it.

Signatures written by `export_saved_model`:

- ``serving_default`` and ``serve`` (the same function, as `keras.Model.export` writes them): the
  full forward pass. Inputs are named after the model's inputs, outputs after its outputs; batch
  and sequence length are dynamic (declare ``keras.Input(shape=(None, ...))``).
- ``initial_state`` and ``decode_step`` (decoder models only): streaming decoding with a fixed-size
  state, see `keras_favor.export.decode`.
"""

import os
import re
import shutil
import uuid

import keras

from keras_favor._checks import invalid, positive_int
from keras_favor.export._signatures import (
    DECODE_STEP,
    INITIAL_STATE,
    SERVE,
    SERVING_DEFAULT,
    check_input_name,
    model_input_specs,
    model_output_names,
    name_outputs,
    symbolic_inputs,
    tensor_spec,
)
from keras_favor.export.decode import DecodeSignatures, add_decode_endpoints

__all__ = [
    "DECODE_STEP",
    "INITIAL_STATE",
    "SERVE",
    "SERVING_DEFAULT",
    "check_inference_ops",
    "export_saved_model",
    "saved_model_op_types",
    "saved_model_signature_names",
]

SAVED_MODEL_PB = "saved_model.pb"

# Op types that draw random numbers or orthogonalise: they belong at build / redraw time, never in
# an inference graph (results would change per request, and TFLite has no builtin for most).
_FORBIDDEN_OP = re.compile(
    r"Random|Multinomial|TruncatedNormal|^Rng|^StatefulUniform|^StatefulStandardNormal"
    r"|^NonDeterministicInts$|^Qr$|^Svd$"
)


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

    The model runs in its own dtype policy: under ``mixed_float16`` or ``mixed_bfloat16`` the
    graph computes in that dtype and the outputs come in the compute dtype.

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
        The path of the version directory, a str. Loaded with `tf.saved_model.load`, the
        forward pass is ``loaded.serve(inputs)`` (``inputs`` a dict input name -> tensor) and
        ``loaded.signatures["serving_default"](**inputs)``.

    Example:

    >>> inputs = keras.Input((None, 16), name="tokens")
    >>> model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(inputs))
    >>> path = export_saved_model(model, "saved_models/my_model", version=1)  # doctest: +SKIP
    >>> # tensorflow_model_server --model_name=my_model \\
    >>> #     --model_base_path="$PWD/saved_models/my_model" --rest_api_port=8501
    """
    _check_model(model)
    positive_int(version, "version")
    decode = _decode_signatures(model, decode)
    final_dir = _version_dir(base_path, version, overwrite)
    archive = keras.export.ExportArchive()
    archive.track(model)
    serving_fn, serving_specs = _serving_function(model, input_signature, output_names)
    served = archive.add_endpoint(SERVING_DEFAULT, serving_fn, input_signature=[serving_specs])
    served.get_concrete_function()  # traced once: `serve` is the same function
    archive.add_endpoint(SERVE, served)
    if decode is not None:
        add_decode_endpoints(archive, decode, output_names or model_output_names(model))
    _write_atomically(archive, final_dir, verbose)
    return final_dir


def _check_model(model):
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "keras_favor.export writes TensorFlow graphs and needs the TensorFlow backend: set "
            "KERAS_BACKEND=tensorflow (weights saved as .keras from any backend load there). "
            f"Received: backend={keras.backend.backend()!r}"
        )
    if not isinstance(model, keras.Model):
        raise invalid("model", "a keras.Model", model)
    if not model.built:
        raise invalid("model", "a built keras.Model (call it or build it before export)", model)


def _decode_signatures(model, decode):
    """The `DecodeSignatures` that `decode` asks for, or None."""
    if decode is True or (isinstance(decode, str) and decode == "auto"):
        return DecodeSignatures.from_model(model, strict=decode is True)
    if decode is not None and not isinstance(decode, DecodeSignatures):
        raise invalid("decode", "'auto', True, None or a DecodeSignatures", decode)
    return decode


def _version_dir(base_path, version, overwrite):
    final_dir = os.path.join(os.fspath(base_path), str(version))
    if os.path.exists(final_dir) and not overwrite:
        raise invalid(
            "version",
            f"a version not yet in {os.fspath(base_path)!r} (TF Serving versions are immutable; "
            "pass overwrite=True to replace it)",
            version,
        )
    return final_dir


def _serving_function(model, input_signature, output_names):
    """The forward pass as a function of a dict input name -> tensor, and that dict's specs."""
    if input_signature is None:
        names, specs = model_input_specs(model)
        as_dict = isinstance(symbolic_inputs(model), dict)
        argument = "model"
    else:
        if not isinstance(input_signature, dict) or not input_signature:
            raise invalid(
                "input_signature",
                "a non-empty dict, input name -> keras.InputSpec",
                input_signature,
            )
        names, specs = list(input_signature), list(input_signature.values())
        as_dict = len(names) > 1
        argument = "input_signature"
    serving_specs = {
        check_input_name(name, argument): tensor_spec(spec, name, argument)
        for name, spec in zip(names, specs)
    }
    if output_names is None:
        output_names = model_output_names(model)

    def serve(inputs):
        if as_dict:
            args = inputs
        elif len(names) == 1:
            args = inputs[names[0]]
        else:
            args = [inputs[name] for name in names]
        return name_outputs(model(args, training=False), output_names)

    return serve, serving_specs


def _write_atomically(archive, final_dir, verbose):
    """Writes the archive under a temporary name, checks its ops, then renames it `final_dir`."""
    base_path = os.path.dirname(final_dir)
    os.makedirs(base_path, exist_ok=True)
    # A non-numeric name: TF Serving ignores it while it is being written.
    tmp_dir = os.path.join(base_path, f".tmp-{os.path.basename(final_dir)}-{uuid.uuid4().hex}")
    try:
        archive.write_out(tmp_dir, verbose=verbose)
        check_inference_ops(tmp_dir)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)


def read_saved_model_proto(saved_model_dir):
    """The `SavedModel` proto of a SavedModel directory (its saved_model.pb)."""
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: PLC0415 (lazy)

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(os.fspath(saved_model_dir), SAVED_MODEL_PB), "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def saved_model_signature_names(saved_model_dir):
    """Sorted signature keys of a SavedModel (read from saved_model.pb, nothing loaded).

    Internal keys such as ``__saved_model_init_op`` are left out.
    """
    proto = read_saved_model_proto(saved_model_dir)
    keys = {key for graph in proto.meta_graphs for key in graph.signature_def}
    return sorted(key for key in keys if not key.startswith("__"))


def saved_model_op_types(saved_model_dir):
    """Every op type in a SavedModel: op type -> sorted names of the graphs/functions using it."""
    proto = read_saved_model_proto(saved_model_dir)
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
