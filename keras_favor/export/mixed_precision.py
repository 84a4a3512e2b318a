"""A float32 copy of a model that computes in float16 or bfloat16 (for TFLite).

TFLite's builtin kernels have no float16 or bfloat16 matmul (``BatchMatMul``, ``FullyConnected``),
so a model under a ``mixed_float16`` / ``mixed_bfloat16`` (or ``float16`` / ``bfloat16``) dtype
policy converts to a graph only Flex could run. Its float32 copy has the same architecture and the
same weights (cast to float32), under the float32 policy; TFLite's ``float16`` quantization still
stores the weights in half precision.
"""

import keras

from keras_favor._checks import invalid

HALF_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy")
_HALF_DTYPES = ("float16", "bfloat16")


def half_precision_policies(model):
    """The dtype policies of `model` and its layers that compute in float16 or bfloat16, sorted."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    return sorted(
        {layer.dtype_policy.name for layer in layers if layer.compute_dtype in _HALF_DTYPES}
    )


def float32_copy(model):
    """`model` itself if it computes in float32, else its float32 copy with the same weights.

    Every float16 / bfloat16 dtype policy in the model's config (the model's and each layer's,
    ``dtype`` entries of float16 inputs included) becomes ``float32``; the copy is rebuilt from
    that config under the float32 global policy and given `model`'s weights, cast to float32.

    Args:
        model: a built `keras.Model`.

    Returns:
        `model` or a new built `keras.Model`.

    Raises:
        ValueError: naming ``dtype_policy`` and the fix, if the copy cannot be rebuilt from the
            config (e.g. a subclassed model without `get_config`), its weights do not match, or
            it still computes in half precision.
    """
    policies = half_precision_policies(model)
    if not policies:
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.saving.deserialize_keras_object(
            _to_float32(keras.saving.serialize_keras_object(model))
        )
        weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
        if [tuple(w.shape) for w in copy.weights] != [w.shape for w in weights]:
            raise ValueError("its weights differ from the model's")
        copy.set_weights(
            [w.astype("float32") if w.dtype.name in _HALF_DTYPES else w for w in weights]
        )
        still_half = half_precision_policies(copy)
        if still_half:
            raise ValueError(f"it still computes in {still_half}")
    except Exception as error:  # noqa: BLE001 (any rebuild failure gets the same advice)
        raise invalid(
            "dtype_policy",
            "'float32' for TFLite (no float16 / bfloat16 matmul builtins). The model's float32 "
            f"copy could not be made ({error}): build the model under "
            "keras.config.set_dtype_policy('float32'), load the weights into it and export that",
            policies[0] if len(policies) == 1 else policies,
        ) from error
    finally:
        keras.config.set_dtype_policy(previous)
    return copy


def _to_float32(node):
    """`node` (a serialized config) with every half-precision dtype policy made float32."""
    if isinstance(node, list):
        return [_to_float32(value) for value in node]
    if not isinstance(node, dict):
        return node
    policy = node.get("config") if node.get("class_name") in _POLICY_CLASSES else None
    if isinstance(policy, dict) and policy.get("name") in HALF_POLICIES:
        return dict(node, config=dict(policy, name="float32"))
    return {
        key: "float32" if key == "dtype" and value in HALF_POLICIES else _to_float32(value)
        for key, value in node.items()
    }
