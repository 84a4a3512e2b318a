"""TFLite (LiteRT) export with builtin ops only, and a small runner.

Conversion always goes through an exported SavedModel directory
(`TFLiteConverter.from_saved_model`): converting a Keras 3 model's concrete function directly
leaves its variables uninitialised (NaN / garbage outputs), and `model.export(format="litert")`
silently enables Flex (TF Select) ops, which LiteRT's Python interpreter and most devices cannot
run. Here only ``TFLITE_BUILTINS`` are allowed, and a model that would need Flex fails loudly,
naming each op and where it comes from.

Every SavedModel signature becomes a TFLite signature: ``serving_default`` (dynamic batch and
sequence length; resize the inputs before running) and, for decoder models, ``initial_state`` and
``decode_step``; ``serve``, the same function as ``serving_default``, is left out.

TFLite builtins compute in float32: a Keras model under a float16 or bfloat16 dtype policy
(``mixed_float16``, ``mixed_bfloat16``) is converted as its float32 copy (`float32_copy`).
"""

import os
import re
import shutil
import tempfile

import keras
import numpy as np

from keras_favor._checks import invalid
from keras_favor.export.decode import DecodeSignatures
from keras_favor.export.mixed_precision import float32_copy, half_precision_policies
from keras_favor.export.saved_model import (
    SAVED_MODEL_PB,
    SERVE,
    SERVING_DEFAULT,
    export_saved_model,
    read_saved_model_proto,
    saved_model_signature_names,
)

QUANTIZATIONS = (None, "float16", "dynamic_range")
_DTYPE_NAMES = {"f16": "float16", "bf16": "bfloat16"}
_DETAIL = re.compile(r"^\s*tf\.(\w+)\((.*)$")
_HALF_TENSOR = re.compile(r"tensor<[^>]*x(b?f16)>")


def _flex_ops(error):
    """op -> the places (Keras layer paths) of each op the conversion could not lower."""
    ops = {}
    for entry in getattr(error, "errors", None) or []:
        code = str(getattr(entry, "error_code", ""))
        message = str(getattr(entry, "error_message", ""))
        if "FLEX" in code or "flex op" in message:
            where = [call.name.split("@")[0] for call in entry.location.call][:1]
            ops.setdefault(entry.operator.name.removeprefix("tf."), set()).update(where)
    match = re.search(r"TF Select ops: ([\w, ]+)", str(error))
    for op in match.group(1).split(",") if match else []:
        ops.setdefault(op.strip(), set())
    return ops


def _flex_error(error):
    """A ValueError naming every op the builtin-only conversion could not lower, or None."""
    ops = _flex_ops(error)
    if not ops:
        return None
    text = str(error)
    listing = "; ".join(
        op + (f" (at {', '.join(sorted(where))})" if where else "")
        for op, where in sorted(ops.items())
    )
    message = "TFLite conversion with builtin ops only failed: "
    half = sorted({_DTYPE_NAMES[t] for t in _HALF_TENSOR.findall(text)})
    if half:
        return ValueError(
            message + f"the graph computes in {' and '.join(half)}, which TFLite builtins "
            f"cannot ({listing}): it was exported under a half-precision `dtype_policy` such as "
            "'mixed_float16'. Pass the Keras model itself to `export_tflite` (it converts the "
            "model's float32 copy), or export a copy built under dtype_policy 'float32'."
        )
    message += (
        "these TensorFlow ops have no TFLite builtin and would need Flex (TF Select), which "
        f"LiteRT cannot run without it: {listing}."
    )
    details = sorted({line.strip() for line in text.splitlines() if _DETAIL.match(line)})
    if details:
        message += " Details: " + " | ".join(details[:10])
    return ValueError(
        message + " Rewrite them with builtin-friendly ops: an outer-product einsum as "
        "expand_dims and multiply, an elementwise-contraction einsum as multiply and sum, a slice "
        "that adds axes (x[:, None, :, None]) as expand_dims; draw random features at build or "
        "redraw time, not in call."
    )


def _check_quantization(quantization):
    if quantization not in QUANTIZATIONS:
        raise invalid("quantization", f"one of {QUANTIZATIONS}", quantization)


def _default_signature_keys(saved_model_dir):
    """Every signature but ``serve`` when ``serving_default`` (the same function) is there."""
    keys = saved_model_signature_names(saved_model_dir)
    if SERVING_DEFAULT in keys:
        keys = [key for key in keys if key != SERVE]
    return keys


def convert_saved_model(saved_model_dir, quantization=None, signature_keys=None):
    """Converts a SavedModel directory to TFLite flatbuffer bytes, builtin ops only.

    Args:
        saved_model_dir: a SavedModel directory (e.g. written by `export_saved_model`).
        quantization: None (float32), ``"float16"`` (weights stored as float16, computed in
            float32) or ``"dynamic_range"`` (weights of 1024+ elements stored as int8, per
            channel; activations quantized on the fly for matmuls).
        signature_keys: the signatures to convert (default: all of them but ``serve``, a
            duplicate of ``serving_default``).

    Returns:
        The `.tflite` model as bytes.

    Raises:
        ValueError: naming the op(s) if the model needs Flex (TF Select) ops, or the dtype if
            the SavedModel computes in float16 / bfloat16.
    """
    import tensorflow as tf  # noqa: PLC0415 (lazy: only export needs TensorFlow)

    _check_quantization(quantization)
    saved_model_dir = os.fspath(saved_model_dir)
    if signature_keys is None:
        signature_keys = _default_signature_keys(saved_model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        converter = tf.lite.TFLiteConverter.from_saved_model(
            _without_serve_attribute(saved_model_dir, signature_keys, tmp),
            signature_keys=list(signature_keys),
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantization == "float16":
                converter.target_spec.supported_types = [tf.float16]
        try:
            return converter.convert()
        except Exception as error:  # ConverterError lives in a private module
            flex = _flex_error(error)
            if flex is not None:
                raise flex from None
            raise


def _without_serve_attribute(saved_model_dir, signature_keys, tmp):
    """A SavedModel directory from which the converter keeps every one of `signature_keys`.

    `TFLiteConverter.from_saved_model` takes a SavedModel whose root object has a ``serve``
    function (as `keras.Model.export` and `export_saved_model` write) for a one-endpoint
    `keras.Model.export` artifact, and converts only ``serving_default``, whatever
    `signature_keys` asks. For several signatures it gets a copy written into `tmp` whose root
    lacks that one reference (the signatures themselves are unchanged).
    """
    proto = read_saved_model_proto(saved_model_dir)
    root = proto.meta_graphs[0].object_graph_def.nodes[0]
    serve = [i for i, child in enumerate(root.children) if child.local_name == SERVE]
    if len(signature_keys) < 2 or not serve:
        return saved_model_dir
    del root.children[serve[0]]
    copy = os.path.join(tmp, "saved_model")
    shutil.copytree(saved_model_dir, copy, ignore=shutil.ignore_patterns(SAVED_MODEL_PB))
    with open(os.path.join(copy, SAVED_MODEL_PB), "wb") as f:
        f.write(proto.SerializeToString())
    return copy


def export_tflite(
    model_or_saved_model_dir,
    path,
    quantization=None,
    *,
    signature_keys=None,
    **export_kwargs,
):
    """Exports a Keras model (or an exported SavedModel directory) as a builtins-only `.tflite`.

    A Keras model is first exported with `export_saved_model` (into a temporary directory), so
    the TFLite model has the same signatures: ``serving_default`` and, for decoder models,
    ``initial_state`` and ``decode_step``. A model that computes in float16 or bfloat16 (dtype
    policy ``mixed_float16``, ``mixed_bfloat16``, ``float16`` or ``bfloat16``) is exported as its
    float32 copy: the same weights cast to float32, under the float32 policy (`float32_copy`);
    the model passed in is left as it is. Pass ``quantization="float16"`` to store the weights
    in half precision.

    Args:
        model_or_saved_model_dir: a built `keras.Model` or a SavedModel directory.
        path: the `.tflite` file to write.
        quantization: None, ``"float16"`` or ``"dynamic_range"`` (see `convert_saved_model`).
        signature_keys: the signatures to convert (default: all of them but ``serve``).
        **export_kwargs: passed to `export_saved_model` when a model is given (e.g. ``decode``,
            ``input_signature``).

    Returns:
        `path`, a str.

    Raises:
        ValueError: naming the op(s) if the model needs Flex (TF Select) ops; naming
            ``dtype_policy`` if a half-precision model's float32 copy cannot be made, or if
            ``decode`` is a `DecodeSignatures` (whose functions run the half-precision layers).

    Example:

    >>> export_tflite(model, "model.tflite")  # doctest: +SKIP
    >>> runner = TFLiteRunner("model.tflite")  # doctest: +SKIP
    >>> runner.run({"tokens": x})["logits"]  # any batch size and length  # doctest: +SKIP
    """
    path = os.fspath(path)
    _check_quantization(quantization)  # fail before the (slow) SavedModel export
    if isinstance(model_or_saved_model_dir, (str, os.PathLike)):
        flatbuffer = convert_saved_model(model_or_saved_model_dir, quantization, signature_keys)
    else:
        model = _float32_model(model_or_saved_model_dir, export_kwargs.get("decode"))
        with tempfile.TemporaryDirectory() as tmp:
            saved_model_dir = export_saved_model(model, tmp, version=1, **export_kwargs)
            flatbuffer = convert_saved_model(saved_model_dir, quantization, signature_keys)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def _float32_model(model, decode):
    """`model`, or its float32 copy if it computes in half precision (see `float32_copy`)."""
    if not isinstance(model, keras.Model):
        return model  # `export_saved_model` says what is wrong with it
    if isinstance(decode, DecodeSignatures):
        policies = half_precision_policies(model)
        if policies:
            raise invalid(
                "dtype_policy",
                "'float32' for TFLite when `decode` is a DecodeSignatures: its functions run the "
                "model's half-precision layers. Build the DecodeSignatures on a float32 copy "
                "(`keras_favor.export.mixed_precision.float32_copy(model)`) and export that copy",
                policies[0] if len(policies) == 1 else policies,
            )
    return float32_copy(model)


class TFLiteRunner:
    """Runs the signatures of a `.tflite` model with LiteRT's `Interpreter`.

    Inputs may have any batch size and sequence length: every input tensor is resized
    (`resize_tensor_input`) to the given array's shape and the tensors reallocated before running.

    Args:
        model: a `.tflite` path or the flatbuffer bytes.
        num_threads: interpreter threads (None: LiteRT's default).
    """

    def __init__(self, model, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (lazy)

        kwargs = {"num_threads": num_threads} if num_threads else {}
        if isinstance(model, (bytes, bytearray)):
            self.interpreter = Interpreter(model_content=bytes(model), **kwargs)
        else:
            self.interpreter = Interpreter(model_path=os.fspath(model), **kwargs)
        self._runners = {}

    @property
    def signature_names(self):
        """Sorted signature keys."""
        return sorted(self.interpreter.get_signature_list())

    def signature(self, signature_name=SERVING_DEFAULT):
        """(input names, output names) of a signature."""
        signatures = self.interpreter.get_signature_list()
        if signature_name not in signatures:
            raise invalid("signature_name", f"one of {sorted(signatures)}", signature_name)
        entry = signatures[signature_name]
        return list(entry["inputs"]), list(entry["outputs"])

    def run(self, inputs, signature_name=SERVING_DEFAULT):
        """Runs one signature.

        Args:
            inputs: dict input name -> array-like (cast to the input's dtype).
            signature_name: the signature key.

        Returns:
            dict output name -> numpy array (copies).
        """
        input_names, _ = self.signature(signature_name)
        if set(inputs) != set(input_names):
            raise invalid(
                "inputs",
                f"a dict with keys {sorted(input_names)} (signature {signature_name!r})",
                sorted(inputs),
            )
        if signature_name not in self._runners:
            self._runners[signature_name] = self.interpreter.get_signature_runner(signature_name)
        runner = self._runners[signature_name]
        details = runner.get_input_details()
        # The signature runner resizes every input tensor to the array's shape
        # (ResizeInputTensor, as `resize_tensor_input`) and reallocates before invoking.
        feed = {
            name: np.ascontiguousarray(np.asarray(value, dtype=details[name]["dtype"]))
            for name, value in inputs.items()
        }
        return {name: np.array(value) for name, value in runner(**feed).items()}
