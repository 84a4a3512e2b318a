"""Test tools that run a SavedModel the ways TF Serving and its clients do (no server needed).

Not part of `keras_favor.export`'s API: examples and tests import them from here to check an
export the way a server loads and answers it.

- `SavedModelSession`: loads a SavedModel through the TF C API (`TF_LoadSessionFromSavedModel`,
  the C++ SavedModel loader TF Serving is built on) and runs a signature with `TF_SessionRun`,
  via ctypes on the `libtensorflow_cc.so.2` shipped in the TensorFlow wheel. No Python TF
  function runs the model: tensors go straight through the C API.
- `saved_model_cli_run`: runs a signature with TensorFlow's `saved_model_cli run` (the TF1 session
  loader) in a subprocess.
- `rest_predict`: TF Serving's REST predict API (``POST /v1/models/<name>:predict``) in one
  function, request and response shapes exactly as TF Serving's: row format ``{"instances": …}``
  -> ``{"predictions": …}``, columnar format ``{"inputs": …}`` -> ``{"outputs": …}``.
"""

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from keras_favor._checks import invalid
from keras_favor.export.saved_model import SERVING_DEFAULT

# TF_DataType enum values (tensorflow/c/tf_datatype.h) and numpy dtypes.
_TF_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    17: np.uint16,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}
_NP_TO_TF = {np.dtype(v): k for k, v in _TF_DTYPES.items()}


class _TFOutput(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


_LIB = None


def tensorflow_c_library_path():
    """Path of `libtensorflow_cc.so.2` inside the installed TensorFlow wheel (not imported)."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("TensorFlow is not installed: `pip install tensorflow`.")
    for location in spec.submodule_search_locations:
        for name in ("libtensorflow_cc.so.2", "libtensorflow_cc.2.dylib"):
            path = os.path.join(location, name)
            if os.path.exists(path):
                return path
    raise RuntimeError(
        f"No libtensorflow_cc shared library found in {list(spec.submodule_search_locations)}."
    )


def _library():
    global _LIB
    if _LIB is not None:
        return _LIB
    # Default dlopen mode (RTLD_LOCAL): RTLD_GLOBAL makes a later `import tensorflow` crash.
    lib = ctypes.CDLL(tensorflow_c_library_path())
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    signatures = {
        "TF_NewStatus": ([], p),
        "TF_DeleteStatus": ([p], None),
        "TF_GetCode": ([p], i),
        "TF_Message": ([p], ctypes.c_char_p),
        "TF_NewGraph": ([], p),
        "TF_DeleteGraph": ([p], None),
        "TF_NewSessionOptions": ([], p),
        "TF_DeleteSessionOptions": ([p], None),
        "TF_NewBuffer": ([], p),
        "TF_DeleteBuffer": ([p], None),
        "TF_LoadSessionFromSavedModel": (
            [p, p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), i, p, p, p],
            p,
        ),
        "TF_CloseSession": ([p, p], None),
        "TF_DeleteSession": ([p, p], None),
        "TF_GraphOperationByName": ([p, ctypes.c_char_p], p),
        "TF_SessionRun": (
            [
                p,
                p,
                ctypes.POINTER(_TFOutput),
                ctypes.POINTER(p),
                i,
                ctypes.POINTER(_TFOutput),
                ctypes.POINTER(p),
                i,
                p,
                i,
                p,
                p,
            ],
            None,
        ),
        "TF_AllocateTensor": ([i, ctypes.POINTER(i64), i, ctypes.c_size_t], p),
        "TF_DeleteTensor": ([p], None),
        "TF_TensorData": ([p], p),
        "TF_TensorByteSize": ([p], ctypes.c_size_t),
        "TF_TensorType": ([p], i),
        "TF_NumDims": ([p], i),
        "TF_Dim": ([p, i], i64),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _LIB = lib
    return lib


class _TFBuffer(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("length", ctypes.c_size_t),
        ("dealloc", ctypes.c_void_p),
    ]


def _check(lib, status, what):
    code = lib.TF_GetCode(status)
    if code != 0:
        message = lib.TF_Message(status).decode("utf-8", "replace")
        raise RuntimeError(f"{what} failed (TF status code {code}): {message}")


def _new_tensor(lib, value, tf_type, name):
    """A new TF_Tensor of TF dtype enum `tf_type` holding `value` (the caller deletes it)."""
    if tf_type not in _TF_DTYPES:
        raise ValueError(f"Input {name!r}: unsupported TF dtype enum {tf_type}.")
    array = np.ascontiguousarray(np.asarray(value, dtype=_TF_DTYPES[tf_type]))
    dims = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
    tensor = lib.TF_AllocateTensor(tf_type, dims, array.ndim, array.nbytes)
    if array.nbytes:
        ctypes.memmove(lib.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
    return tensor


def _read_tensor(lib, tensor, name):
    """A TF_Tensor's contents, copied into a numpy array."""
    tf_type = lib.TF_TensorType(tensor)
    if tf_type not in _TF_DTYPES:
        raise ValueError(f"Output {name!r}: unsupported TF dtype enum {tf_type}.")
    shape = tuple(lib.TF_Dim(tensor, d) for d in range(lib.TF_NumDims(tensor)))
    size = lib.TF_TensorByteSize(tensor)
    raw = ctypes.string_at(lib.TF_TensorData(tensor), size) if size else b""
    return np.frombuffer(raw, dtype=_TF_DTYPES[tf_type]).reshape(shape).copy()


class SavedModelSession:
    """A SavedModel loaded and run through the TensorFlow C API, as TF Serving loads it.

    Args:
        export_dir: the SavedModel (version) directory.
        tags: MetaGraph tags to load (TF Serving loads ``"serve"``).

    Example:

    >>> with SavedModelSession("saved_models/my_model/1") as session:  # doctest: +SKIP
    ...     outputs = session.run({"tokens": x})  # dict output name -> numpy array
    """

    def __init__(self, export_dir, tags=("serve",)):
        from tensorflow.core.protobuf import meta_graph_pb2  # noqa: PLC0415 (protos only)

        lib = _library()
        self._lib = lib
        self._session = None
        self._graph = lib.TF_NewGraph()
        status = lib.TF_NewStatus()
        options = lib.TF_NewSessionOptions()
        meta_buffer = lib.TF_NewBuffer()
        tag_array = (ctypes.c_char_p * len(tags))(*[t.encode() for t in tags])
        try:
            session = lib.TF_LoadSessionFromSavedModel(
                options,
                None,
                os.fspath(export_dir).encode(),
                tag_array,
                len(tags),
                self._graph,
                meta_buffer,
                status,
            )
            _check(lib, status, f"Loading SavedModel {os.fspath(export_dir)!r}")
            self._session = session
            buf = _TFBuffer.from_address(meta_buffer)
            meta_graph = meta_graph_pb2.MetaGraphDef()
            meta_graph.ParseFromString(ctypes.string_at(buf.data, buf.length))
        finally:
            lib.TF_DeleteBuffer(meta_buffer)
            lib.TF_DeleteSessionOptions(options)
            lib.TF_DeleteStatus(status)
        self._signatures = {}
        for key, sig in meta_graph.signature_def.items():
            if key.startswith("__"):  # __saved_model_init_op: run by the loader itself
                continue
            self._signatures[key] = (
                {name: info.name for name, info in sig.inputs.items()},
                {name: info.name for name, info in sig.outputs.items()},
                {name: info.dtype for name, info in sig.inputs.items()},
            )

    @property
    def signature_names(self):
        """Sorted signature keys of the loaded MetaGraph."""
        return sorted(self._signatures)

    def signature(self, signature_name=SERVING_DEFAULT):
        """(input names, output names) of a signature, each sorted."""
        inputs, outputs, _ = self._get(signature_name)
        return sorted(inputs), sorted(outputs)

    def input_dtypes(self, signature_name=SERVING_DEFAULT):
        """dict input name -> numpy dtype of a signature's inputs."""
        _, _, dtypes = self._get(signature_name)
        return {name: np.dtype(_TF_DTYPES[dtype]) for name, dtype in dtypes.items()}

    def _get(self, signature_name):
        if signature_name not in self._signatures:
            raise invalid("signature_name", f"one of {self.signature_names}", signature_name)
        return self._signatures[signature_name]

    def _output(self, tensor_name):
        op_name, _, index = tensor_name.partition(":")
        oper = self._lib.TF_GraphOperationByName(self._graph, op_name.encode())
        if not oper:
            raise RuntimeError(f"Operation {op_name!r} not found in the loaded graph.")
        return _TFOutput(oper, int(index or 0))

    def run(self, inputs, signature_name=SERVING_DEFAULT):
        """Runs one signature with `TF_SessionRun`.

        Args:
            inputs: dict input name -> array-like (cast to the signature's dtype).
            signature_name: the signature key.

        Returns:
            dict output name -> numpy array.
        """
        if self._session is None:
            raise RuntimeError("The session is closed.")
        lib = self._lib
        input_map, output_map, dtypes = self._get(signature_name)
        if set(inputs) != set(input_map):
            raise invalid(
                "inputs",
                f"a dict with keys {sorted(input_map)} (signature {signature_name!r})",
                sorted(inputs),
            )
        in_names, out_names = sorted(input_map), sorted(output_map)
        in_ops = (_TFOutput * len(in_names))(*[self._output(input_map[n]) for n in in_names])
        out_ops = (_TFOutput * len(out_names))(*[self._output(output_map[n]) for n in out_names])
        in_tensors = (ctypes.c_void_p * len(in_names))()
        out_tensors = (ctypes.c_void_p * len(out_names))()
        status = lib.TF_NewStatus()
        try:
            for j, name in enumerate(in_names):
                in_tensors[j] = _new_tensor(lib, inputs[name], dtypes[name], name)
            lib.TF_SessionRun(
                self._session,
                None,
                in_ops,
                in_tensors,
                len(in_names),
                out_ops,
                out_tensors,
                len(out_names),
                None,
                0,
                None,
                status,
            )
            _check(lib, status, f"Running signature {signature_name!r}")
            return {
                name: _read_tensor(lib, out_tensors[j], name) for j, name in enumerate(out_names)
            }
        finally:
            for tensor in [*in_tensors, *out_tensors]:
                if tensor:
                    lib.TF_DeleteTensor(tensor)
            lib.TF_DeleteStatus(status)

    def close(self):
        """Closes the session and frees the graph."""
        lib = self._lib
        if self._session is not None:
            status = lib.TF_NewStatus()
            lib.TF_CloseSession(self._session, status)
            lib.TF_DeleteSession(self._session, status)
            lib.TF_DeleteStatus(status)
            self._session = None
        if self._graph is not None:
            lib.TF_DeleteGraph(self._graph)
            self._graph = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


def saved_model_cli_run(
    saved_model_dir, inputs, signature_name=SERVING_DEFAULT, tag_set="serve", timeout=300
):
    """Runs a signature with ``saved_model_cli run`` in a subprocess.

    Args:
        saved_model_dir: the SavedModel (version) directory.
        inputs: dict input name -> array-like, passed as ``.npy`` files (``--inputs``).
        signature_name: the signature key (``--signature_def``).
        tag_set: ``--tag_set``.
        timeout: seconds before the subprocess is killed.

    Returns:
        dict output name -> numpy array, read from the ``--outdir`` files.
    """
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for i, (name, value) in enumerate(sorted(inputs.items())):
            path = os.path.join(tmp, f"input_{i}.npy")
            np.save(path, np.asarray(value))
            parts.append(f"{name}={path}")
        outdir = os.path.join(tmp, "outputs")
        command = [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
            "run",
            "--dir",
            os.fspath(saved_model_dir),
            "--tag_set",
            tag_set,
            "--signature_def",
            signature_name,
            "--inputs",
            ";".join(parts),
            "--outdir",
            outdir,
        ]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(
                f"saved_model_cli run failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
            )
        return {
            name[: -len(".npy")]: np.load(os.path.join(outdir, name))
            for name in sorted(os.listdir(outdir))
        }


def _jsonable(array):
    array = np.asarray(array)
    if array.dtype.kind in "SUO":
        raise ValueError(f"String outputs are not supported here. Received dtype {array.dtype}")
    return array.tolist()


def _rest_error(message, request):
    text = request if isinstance(request, str) else json.dumps(request)
    return ValueError(f"{message} Received: request={text[:200]}")


def _parse_request(request):
    """The request body as a dict with exactly one of "instances" and "inputs"."""
    if isinstance(request, (str, bytes)):
        try:
            request = json.loads(request)
        except json.JSONDecodeError as error:
            raise _rest_error(f"The request is not valid JSON: {error}.", request) from None
    if not isinstance(request, dict):
        raise _rest_error("The request must be a JSON object.", request)
    if ("instances" in request) == ("inputs" in request):
        raise _rest_error(
            'The request must hold exactly one of "instances" (row format) or "inputs" '
            "(columnar format).",
            request,
        )
    unknown = set(request) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise _rest_error(f"Unknown request keys {sorted(unknown)}.", request)
    return request


def _by_name(value, names, what, request):
    """`value` as a dict input name -> value: an object with those keys, or a single input's
    value."""
    if isinstance(value, dict):  # a tensor value is never an object
        if set(value) != set(names):
            raise _rest_error(f"{what} must be an object with keys {names}.", request)
        return value
    if len(names) != 1:
        raise _rest_error(
            f"The signature has several inputs {names}: {what} must be an object input name -> "
            "value.",
            request,
        )
    return {names[0]: value}


def _feed(request, dtypes):
    """dict input name -> numpy array, from either request format."""
    names = sorted(dtypes)
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise _rest_error('"instances" must be a non-empty list.', request)
        rows = [_by_name(row, names, "every instance", request) for row in instances]
        values = {name: [row[name] for row in rows] for name in names}
    else:
        values = _by_name(request["inputs"], names, '"inputs"', request)
    feed = {}
    for name in names:
        try:
            feed[name] = np.asarray(values[name], dtype=dtypes[name])
        except (TypeError, ValueError) as error:
            raise _rest_error(
                f"Input {name!r} is not a rectangular {dtypes[name]} array ({error}).", request
            ) from None
    return feed


def _response(outputs, rows):
    """TF Serving's response body: {"predictions": ...} (rows) or {"outputs": ...}."""
    columns = {name: _jsonable(value) for name, value in sorted(outputs.items())}
    if not rows:
        return {"outputs": columns.popitem()[1] if len(columns) == 1 else columns}
    sizes = {np.shape(value)[0] if np.ndim(value) else None for value in outputs.values()}
    if len(sizes) != 1 or None in sizes:
        shapes = {name: np.shape(value) for name, value in outputs.items()}
        raise ValueError(
            "Row format needs every output to have the same batch (0th) dimension; use the "
            f'columnar format ("inputs"). Output shapes: {shapes}'
        )
    if len(columns) == 1:
        return {"predictions": columns.popitem()[1]}
    return {"predictions": [dict(zip(columns, row)) for row in zip(*columns.values())]}


def rest_predict(model, request, signature_name=None):
    """Answers a TF Serving REST predict request, in TF Serving's JSON shapes.

    Row format (``"instances"``): a list with one entry per example; with one named input each
    entry is that input's value (or a one-key object), with several inputs each entry is an
    object input name -> value. The inputs are stacked along a new batch axis. Answer:
    ``{"predictions": [...]}``, one entry per example: the value of the single output, or an
    object output name -> value when there are several.

    Columnar format (``"inputs"``): the value of the single input, or an object input name ->
    batched value. Answer: ``{"outputs": value}`` for a single output, else
    ``{"outputs": {name: value, ...}}``.

    Args:
        model: a `SavedModelSession`, or a SavedModel directory (loaded into one for this
            request).
        request: the request body, a JSON str or the parsed dict.
        signature_name: overrides the request's ``"signature_name"`` (default
            ``serving_default``).

    Returns:
        The response body as a dict (serialise with `json.dumps`; NaN and Inf come out as
        ``NaN`` / ``Infinity`` as in TF Serving).

    Raises:
        ValueError: for a malformed request (a server answers HTTP 400 ``{"error": message}``).

    Example:

    >>> body = {"instances": [[[0.1] * 16] * 5]}  # one example, 5 tokens of width 16
    >>> rest_predict("saved_models/my_model/1", body)  # doctest: +SKIP
    {'predictions': [[[...], ...]]}
    """
    request = _parse_request(request)
    if isinstance(model, (str, os.PathLike)):
        with SavedModelSession(model) as session:
            return rest_predict(session, request, signature_name)
    if not isinstance(model, SavedModelSession):
        raise invalid("model", "a SavedModelSession or a SavedModel directory", model)
    signature_name = signature_name or request.get("signature_name", SERVING_DEFAULT)
    feed = _feed(request, model.input_dtypes(signature_name))
    return _response(model.run(feed, signature_name), rows="instances" in request)
