"""Every benchmark runs as a script from any working directory: `python benchmarks/NAME.py --help`.

The benchmarks are scripts, not tests (their figures are recorded in benchmarks/results/); this
only checks that each one starts, imports the package from the checkout and parses its arguments,
as the README's commands run them.
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")
SCRIPTS = sorted(
    name
    for name in os.listdir(BENCHMARKS)
    if name.endswith(".py") and not name.startswith("_") and name != "common.py"
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts_from_another_directory(script, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), "--help"],
        cwd=tmp_path,  # not the repository root: the script must find the package itself
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_dispatcher_lists_every_benchmark():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    listed = result.stdout.rsplit("available:", 1)[-1]
    for script in SCRIPTS:
        assert script[:-3] in listed


def test_serving_inference_floor_is_the_value_projection():
    # benchmarks/serving_inference.py's "floor" model: each FavorAttention outputs its projected
    # values (the decode step too, leaving the state as it was); the layer is restored after.
    import keras
    import numpy as np

    from benchmarks.serving_inference import attention_floor
    from keras_favor import FavorAttention

    layer = FavorAttention(num_heads=2, key_dim=4, num_random_features=8, seed=0)
    x = np.random.default_rng(0).normal(size=(1, 6, 8)).astype("float32")
    favor = keras.ops.convert_to_numpy(layer(x, x, use_causal_mask=True))
    values = keras.ops.convert_to_numpy(layer._output_dense(layer._value_dense(x)))
    state = layer.get_initial_state(1)
    with attention_floor():
        floor = keras.ops.convert_to_numpy(layer(x, x, use_causal_mask=True))
        step, new_state = layer.step(x[:, 2], x[:, 2], state)
    np.testing.assert_allclose(floor, values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(step), values[:, 2], atol=1e-6)
    assert all(new is old for new, old in zip(new_state, state))
    assert np.abs(favor - values).max() > 1e-3  # attention mixes positions; the floor does not
    restored = keras.ops.convert_to_numpy(layer(x, x, use_causal_mask=True))
    np.testing.assert_array_equal(restored, favor)
