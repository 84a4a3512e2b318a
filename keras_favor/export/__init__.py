"""Export for TF Serving and TFLite (LiteRT); the only part of keras_favor that uses TensorFlow.

Import it explicitly (``from keras_favor import export``); TensorFlow is imported lazily, when a
function needs it.

- `export_saved_model`: TF Serving layout ``<base_path>/<version>/`` with a dynamic-shape
  ``serving_default`` (also ``serve``, as `keras.Model.export`) and, for decoder models,
  ``initial_state`` / ``decode_step`` signatures (`DecodeSignatures` for other models).
- `export_tflite`: builtin-ops-only `.tflite` (float32, float16 or dynamic-range int8) with the
  same signatures; a float16 / bfloat16 model is converted as its float32 copy. `TFLiteRunner`
  runs the signatures at any length.

Submodules hold the rest: `saved_model` (signature-name constants, `check_inference_ops`,
`saved_model_signature_names`), `tflite` (`convert_saved_model`), `mixed_precision`
(`float32_copy`), and `testing`: tools that check a SavedModel the way servers load and answer it
(`SavedModelSession`, the TF C API loader TF Serving uses; `saved_model_cli_run`; `rest_predict`,
TF Serving's REST JSON formats).
"""

from keras_favor.export.decode import DecodeSignatures
from keras_favor.export.saved_model import export_saved_model
from keras_favor.export.tflite import TFLiteRunner, export_tflite

__all__ = [
    "DecodeSignatures",
    "TFLiteRunner",
    "export_saved_model",
    "export_tflite",
]
