"""Export for TF Serving and TFLite (LiteRT); the only part of keras_favor that uses TensorFlow.

Import it explicitly (``from keras_favor import export``); TensorFlow is imported lazily, when a
function needs it.

- `export_saved_model`: TF Serving layout ``<base_path>/<version>/`` with a dynamic-shape
  ``serving_default`` and, for decoder models, ``initial_state`` / ``decode_step`` signatures.
- `export_tflite`: builtin-ops-only `.tflite` (float32, float16 or dynamic-range int8) with the
  same signatures; `TFLiteRunner` runs them at any length.
- `SavedModelSession` (TF C API loader, as TF Serving), `saved_model_cli_run` and `rest_predict`
  (TF Serving's REST JSON request/response formats) check a SavedModel the way servers load it.
"""

from keras_favor.export.saved_model import (
    DECODE_STEP,
    INITIAL_STATE,
    SERVING_DEFAULT,
    DecodeSignatures,
    check_inference_ops,
    export_saved_model,
    saved_model_op_types,
    saved_model_signature_names,
)
from keras_favor.export.serving import SavedModelSession, rest_predict, saved_model_cli_run
from keras_favor.export.tflite import TFLiteRunner, convert_saved_model, export_tflite

__all__ = [
    "DECODE_STEP",
    "INITIAL_STATE",
    "SERVING_DEFAULT",
    "DecodeSignatures",
    "SavedModelSession",
    "TFLiteRunner",
    "check_inference_ops",
    "convert_saved_model",
    "export_saved_model",
    "export_tflite",
    "rest_predict",
    "saved_model_cli_run",
    "saved_model_op_types",
    "saved_model_signature_names",
]
