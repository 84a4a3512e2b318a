"""`RedrawRandomFeatures` under `tf.distribute`: real training runs in subprocesses.

- `MirroredStrategy` over 2 logical CPU devices (configured in a fresh process, before TensorFlow
  initialises its devices): after every step each replica's copy of every projection is identical,
  the redraws follow the schedule, and both replicas compute the same outputs.
- `MultiWorkerMirroredStrategy` with 2 worker processes on 127.0.0.1 (`TF_CONFIG`, ports chosen at
  run time), the callback without a seed: both workers hold identical projections after every
  step and compute the same outputs.

Each process runs `_distributed_worker.py` and writes what it saw to an .npz file; the assertions
are here. `steps_per_execution` stays 1: Keras 3.15's `fit` fails under tf.distribute strategies
with `steps_per_execution > 1` for any model (a Keras bug); the callback's handling of it is
tested in `test_redraw_random_features.py`.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow", reason="tf.distribute needs the TensorFlow backend"
    ),
    pytest.mark.slow,  # several processes that each import TensorFlow and train
]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_distributed_worker.py")
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT_S = 150  # a bound for a hung cluster; a run takes ~10-30 s


def worker_env(tf_config=None):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def run_workers(tmp_path, configs, tf_configs):
    """Starts one process per config, waits for all (killing all at the deadline), loads outputs.

    Returns the outputs, or None when a worker could not bind its port (another process took it
    between `free_ports` and the bind); fails the test on any other error.
    """
    processes, logs = [], []
    try:
        for index, (config, tf_config) in enumerate(zip(configs, tf_configs)):
            log = open(os.path.join(tmp_path, f"worker_{index}.log"), "w+")
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, WORKER, json.dumps(config)],
                    env=worker_env(tf_config),
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failures = []
    for process, log in zip(processes, logs):
        log.seek(0)
        if process.returncode != 0:
            failures.append(f"exit code {process.returncode}:\n{log.read()[-4000:]}")
        log.close()
    if failures:
        if any("address already in use" in failure.lower() for failure in failures):
            return None
        pytest.fail("\n\n".join(failures))
    return [dict(np.load(config["out"])) for config in configs]


def free_ports(count):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def assert_follows_schedule(result, every_n_steps, steps):
    """Step i trains with redraw ⌊i / n⌋ on every replica, so after step i (counted from 0) and
    until the next step starts, the count is ⌊i / n⌋; a projection changes exactly when its count
    does."""
    iterations = result["iterations"]  # 0 when training starts, then i + 1 after step i
    np.testing.assert_array_equal(iterations, np.arange(steps + 1))
    counts = result["counts"]  # (checks, layers, local replicas)
    expected = (np.maximum(iterations - 1, 0) // every_n_steps)[:, None, None]
    np.testing.assert_array_equal(counts, np.broadcast_to(expected, counts.shape))
    projections = result["projections"]  # (checks, layers, local replicas, M, H)
    for check in range(1, len(projections)):
        changed = np.any(projections[check] != projections[check - 1], axis=(-2, -1))
        np.testing.assert_array_equal(changed, counts[check] != counts[check - 1])


def test_mirrored_strategy_every_replica_holds_the_same_projection(tmp_path):
    every_n_steps, steps, seed = 2, 6, 3
    config = {
        "mode": "mirrored",
        "out": os.path.join(tmp_path, "mirrored.npz"),
        "every_n_steps": every_n_steps,
        "steps_per_execution": 1,
        "steps": steps,
        "seed": seed,
    }
    (result,) = run_workers(tmp_path, [config], [None])  # binds no port

    assert int(result["num_replicas"]) == 2
    assert int(result["num_redrawn"]) == 2  # nested in a sub-model and a custom layer; not "elu"
    projections = result["projections"]
    assert projections.shape[2] == 2  # both replicas' copies were read
    # Every replica's copy is identical after every step, redraws included.
    np.testing.assert_array_equal(projections[:, :, 0], projections[:, :, 1])
    np.testing.assert_array_equal(result["counts"][:, :, 0], result["counts"][:, :, 1])
    assert_follows_schedule(result, every_n_steps, steps)
    # Both replicas compute the same outputs from the same batch.
    np.testing.assert_array_equal(result["outputs"][0], result["outputs"][1])

    # The subprocess drew exactly the projections this process derives from the seed.
    from keras_favor.callbacks import redraw_seed
    from keras_favor.ops import random_features_matrix

    final_count = (steps - 1) // every_n_steps  # what the last step, 5, trained with
    for layer_index in range(2):
        # The worker's layers have M = 8 random features of key dim H = 4.
        expected = random_features_matrix(8, 4, seed=redraw_seed(seed, final_count, layer_index))
        np.testing.assert_array_equal(projections[-1, layer_index, 0], np.asarray(expected))


def test_multi_worker_mirrored_strategy_workers_end_with_identical_projections(tmp_path):
    every_n_steps, steps = 3, 8
    configs = [
        {
            "mode": "multiworker",
            "out": os.path.join(tmp_path, f"worker_{index}.npz"),
            "every_n_steps": every_n_steps,
            "steps_per_execution": 1,
            "steps": steps,
            "seed": None,  # each worker derives the same base seed from the shared projections
            "set_random_seed": False,  # initial weights agree only through the strategy
        }
        for index in range(2)
    ]
    for _ in range(2):  # a second try only if a port was taken before the workers bound it
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
        tf_configs = [
            {"cluster": cluster, "task": {"type": "worker", "index": index}} for index in range(2)
        ]
        results = run_workers(tmp_path, configs, tf_configs)
        if results is not None:
            break
    assert results is not None, "could not bind free ports on 127.0.0.1 twice"
    first, second = results

    assert int(first["num_replicas"]) == int(second["num_replicas"]) == 2
    assert int(first["num_redrawn"]) == int(second["num_redrawn"]) == 2
    for result in (first, second):
        assert_follows_schedule(result, every_n_steps, steps)
    # Identical projections (and counts) on both workers after every step, and the same outputs.
    np.testing.assert_array_equal(first["projections"], second["projections"])
    np.testing.assert_array_equal(first["counts"], second["counts"])
    np.testing.assert_array_equal(first["outputs"], second["outputs"])
    # The redraws really replaced the projections.
    assert not np.array_equal(first["projections"][0], first["projections"][-1])
