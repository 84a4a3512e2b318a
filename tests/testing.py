"""A small test harness for keras_favor layers, after keras-hub's `TestCase.run_layer_test`.

`TestCase.run_layer_test` checks, for one layer class and one set of constructor arguments:
the config round trip (every `__init__` argument in `get_config` and as an attribute, and, when
asked, a non-default value for every argument), a symbolic call inside a functional model, an eager
call, a fit step, the mixed precision policies, and a `.keras` save / load with bit-identical
outputs. Each part is also a method of its own, for tests that need only one.
"""

import inspect
import json
import os
import tempfile

import keras
import numpy as np

MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


def backend():
    return keras.backend.backend()


def data(*shape, seed=0, scale=1.0):
    """float32 standard-normal test data of `shape` (times `scale`), fixed by `seed`."""
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def to_numpy(x):
    """A tensor or variable (floats, bfloat16 included, as float32) as a numpy array."""
    if isinstance(x, keras.Variable):
        x = x.numpy()
    x = keras.ops.convert_to_tensor(x)
    if "float" in str(x.dtype):
        x = keras.ops.cast(x, "float32")
    return keras.ops.convert_to_numpy(x)


def assert_close_to_scale(got, want, tolerance):
    """|got - want| ≤ tolerance · max(1, max|want|), for the same math run another way (compiled,
    another batch composition, another kernel library): float32 rounding scales with the array's
    largest entries, not with each entry, so a near-zero entry of an O(10) array may be off by an
    ulp of 10. Absolute for unit-scale arrays; relative to the largest entry otherwise (decode
    states, sums over the sequence, reach 55 in the golden language model: one ulp is 3.8e-6)."""
    want = np.asarray(want)
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, atol=tolerance * scale, rtol=0)


def init_arguments(cls):
    """The named `__init__` parameters of `cls` (not `self`, not `**kwargs`) with their defaults,
    including those of the base class an `__init__(self, *args, ...)` forwards its arguments to."""
    arguments = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        for name, p in params.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                arguments.setdefault(name, p.default)
        if not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            return arguments
    return arguments


def _as_dict(input_data):
    if isinstance(input_data, dict):
        return dict(input_data)
    return {"inputs": input_data}


def _call(layer, input_data, call_kwargs):
    if isinstance(input_data, dict):
        return layer(**input_data, **call_kwargs)
    return layer(input_data, **call_kwargs)


def _symbolic_inputs(input_data):
    """keras.Input tensors with the data's shapes (batch left free), in the data's structure."""
    data = _as_dict(input_data)
    inputs = {
        name: keras.Input(shape=np.shape(value)[1:], dtype=str(np.asarray(value).dtype), name=name)
        for name, value in data.items()
    }
    return inputs if isinstance(input_data, dict) else inputs["inputs"]


class TestCase:
    """Base class for layer tests (pytest collects subclasses named `Test*`)."""

    # ---------------------------------------------------------------------------------------
    # Parts.

    def run_config_test(
        self,
        cls,
        init_kwargs,
        *,
        require_all_non_default=True,
        attribute_exceptions=(),
    ):
        """Config round trip. Returns the layer built from `init_kwargs` (not yet built).

        Args:
            cls: the layer class.
            init_kwargs: constructor arguments.
            require_all_non_default: check that `init_kwargs` gives every named `__init__`
                argument a value different from its default, so that a `get_config` that drops
                (or `from_config` that ignores) an argument cannot pass.
            attribute_exceptions: arguments that are not same-named attributes (with a reason
                in the caller's test).
        """
        arguments = init_arguments(cls)
        if require_all_non_default:
            missing = [n for n in arguments if n not in init_kwargs]
            assert not missing, f"no value given for arguments {missing}"
            same = [
                n
                for n, default in arguments.items()
                if default is not inspect.Parameter.empty and init_kwargs[n] == default
            ]
            assert not same, f"arguments given their default value: {same}"
        layer = cls(**init_kwargs)
        config = layer.get_config()
        for name in arguments:
            assert name in config, f"`get_config` lacks argument `{name}`"
            if name not in attribute_exceptions:
                assert hasattr(layer, name), f"argument `{name}` is not an attribute"
        json.dumps(config)  # JSON-able
        revived = cls.from_config(config)
        assert revived.get_config() == config
        # Through Keras' registry (the `.keras` format's path), as JSON.
        serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
        deserialized = keras.saving.deserialize_keras_object(serialized)
        assert type(deserialized) is cls
        assert deserialized.get_config() == config
        return layer

    def run_symbolic_call_test(self, layer, input_data, expected_output_shape, call_kwargs=None):
        """Calls `layer` on keras.Input tensors; returns the functional model around it."""
        call_kwargs = call_kwargs or {}
        inputs = _symbolic_inputs(input_data)
        outputs = _call(layer, inputs, call_kwargs)
        assert tuple(outputs.shape) == (None,) + tuple(expected_output_shape[1:])
        assert outputs.dtype == layer.compute_dtype
        return keras.Model(inputs, outputs)

    def run_eager_call_test(self, layer, input_data, expected_output_shape, call_kwargs=None):
        """Calls `layer` on arrays; returns the output as numpy."""
        output = _call(layer, input_data, call_kwargs or {})
        assert tuple(output.shape) == tuple(expected_output_shape)
        assert keras.backend.standardize_dtype(output.dtype) == layer.compute_dtype
        output = to_numpy(output)
        assert np.all(np.isfinite(output))
        return output

    def run_training_step_test(self, model, input_data, *, jit_compile=False):
        """One SGD step on random targets: finite loss, and every trainable weight moves."""
        outputs = model.predict(input_data, verbose=0)
        targets = np.random.default_rng(0).normal(size=outputs.shape).astype("float32")
        before = [to_numpy(w) for w in model.trainable_weights]
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
        history = model.fit(input_data, targets, batch_size=len(targets), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        for w, b in zip(model.trainable_weights, before):
            assert not np.array_equal(to_numpy(w), b), f"weight {w.path} did not train"

    def run_mixed_precision_test(
        self, cls, init_kwargs, input_data, call_kwargs=None, *, relative_tolerance=0.05
    ):
        """Under each mixed policy: float32 variables, outputs in the compute dtype, close to the
        same layer in float32 (relative to the output's scale)."""
        call_kwargs = call_kwargs or {}
        for policy_name in MIXED_POLICIES:
            policy = keras.dtype_policies.get(policy_name)
            layer = cls(**init_kwargs, dtype=policy_name)
            output = _call(layer, input_data, call_kwargs)
            assert keras.backend.standardize_dtype(output.dtype) == policy.compute_dtype
            for w in layer.weights:
                if "float" in str(w.dtype):
                    assert w.dtype == "float32", f"{w.path} is {w.dtype} under {policy_name}"
            reference = cls(**init_kwargs)
            _call(reference, input_data, call_kwargs)
            reference.set_weights(layer.get_weights())
            expected = to_numpy(_call(reference, input_data, call_kwargs))
            output = to_numpy(output)
            assert np.all(np.isfinite(output)), policy_name
            scale = np.abs(expected).max() + 1e-6
            error = np.abs(output - expected).max() / scale
            assert error < relative_tolerance, f"{policy_name}: relative error {error:.3g}"

    def run_saving_test(self, model, input_data, custom_objects=None):
        """`.keras` save and load: bit-identical outputs. Returns the loaded model."""
        expected = model.predict(input_data, verbose=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.saving.load_model(path, custom_objects=custom_objects)
        np.testing.assert_array_equal(loaded.predict(input_data, verbose=0), expected)
        for w, v in zip(model.weights, loaded.weights):
            np.testing.assert_array_equal(to_numpy(w), to_numpy(v))
        return loaded

    # ---------------------------------------------------------------------------------------
    # Everything.

    def run_layer_test(
        self,
        cls,
        init_kwargs,
        input_data,
        expected_output_shape,
        *,
        call_kwargs=None,
        expected_num_trainable_weights=None,
        expected_num_non_trainable_weights=None,
        require_all_non_default=False,
        attribute_exceptions=(),
        run_training_check=True,
        run_mixed_precision_check=True,
        run_saving_check=True,
        jit_compile=False,
    ):
        """Config round trip, symbolic and eager calls, a fit step, mixed precision, saving.

        Args:
            cls: the layer class.
            init_kwargs: constructor arguments.
            input_data: an array (the layer's single input) or a dict of arrays (named call
                arguments, e.g. {"query": ..., "value": ...}); its first axis is the batch.
            expected_output_shape: the output shape on `input_data`.
            call_kwargs: other call arguments (e.g. {"use_causal_mask": True}).
            expected_num_trainable_weights: checked when given.
            expected_num_non_trainable_weights: checked when given.
            require_all_non_default: see `run_config_test`.
            attribute_exceptions: see `run_config_test`.
            run_training_check: run a fit step.
            run_mixed_precision_check: run the mixed precision check.
            run_saving_check: run the `.keras` round trip.
            jit_compile: compile the fit step with XLA.
        """
        call_kwargs = call_kwargs or {}
        self.run_config_test(
            cls,
            init_kwargs,
            require_all_non_default=require_all_non_default,
            attribute_exceptions=attribute_exceptions,
        )

        layer = cls(**init_kwargs)
        model = self.run_symbolic_call_test(layer, input_data, expected_output_shape, call_kwargs)
        if expected_num_trainable_weights is not None:
            assert len(layer.trainable_weights) == expected_num_trainable_weights
        if expected_num_non_trainable_weights is not None:
            assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights
        eager = self.run_eager_call_test(layer, input_data, expected_output_shape, call_kwargs)
        # The functional model runs the same layer: the same numbers.
        assert_close_to_scale(model.predict(input_data, verbose=0), eager, 1e-5)

        fresh = cls(**init_kwargs)
        self.run_eager_call_test(fresh, input_data, expected_output_shape, call_kwargs)

        if run_saving_check:
            self.run_saving_test(model, input_data)
        if run_training_check:
            self.run_training_step_test(model, input_data, jit_compile=jit_compile)
        if run_mixed_precision_check:
            self.run_mixed_precision_test(cls, init_kwargs, input_data, call_kwargs)
