"""One training process for `test_distributed.py` (a script, not a test module).

Usage: ``python _distributed_worker.py CONFIG_JSON`` where the JSON object holds:

- ``mode``: ``"mirrored"`` (this process alone, `MirroredStrategy` over 2 logical CPU devices) or
  ``"multiworker"`` (one worker of the `MultiWorkerMirroredStrategy` cluster in ``TF_CONFIG``);
- ``out``: the .npz file to write; ``every_n_steps``, ``steps_per_execution``, ``steps``, ``seed``
  (the callback's seed, or null).

It trains a small model whose random-feature `FavorAttention` layers sit in a sub-model and inside a
custom layer (plus an "elu" one, which has no projection), with `RedrawRandomFeatures`, and after
every execution records each layer's projection and redraw count on every local replica. At the end
it runs the model on the same batch in every replica. The test compares what the files hold.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

EMBED, LENGTH, HEADS, KEY_DIM, FEATURES, BATCH = 8, 6, 2, 4, 8, 4


def make_strategy(mode):
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=30.0)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def work_around_keras_20585(model, strategy):
    """Lets `fit` run under `MultiWorkerMirroredStrategy` (keras-team/keras#20585, open).

    Keras 3.15's `fit` fails twice there, outside anything FAVOR does: (1) it builds the model from
    a batch that it averages over the workers with `strategy.reduce`, which fails on a tuple of
    per-replica values; (2) it averages the scalar logs over the workers with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars. Building from this worker's own
    first batch (only the shapes matter) and averaging the logs over this worker's replicas only
    avoid both. Gradients are still all-reduced across the workers by the strategy.
    """
    from keras.src.backend.tensorflow import trainer

    trainer._collective_all_reduce_multi_worker = lambda strategy: False

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


def build_model():
    import keras

    import keras_favor

    class Block(keras.layers.Layer):
        """A custom layer holding its attention in a list."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attentions = [
                keras_favor.FavorAttention(HEADS, KEY_DIM, num_random_features=FEATURES)
            ]

        def build(self, input_shape):
            self.attentions[0].build(input_shape, input_shape)

        def call(self, x):
            return x + self.attentions[0](x, x)

    inner_inputs = keras.Input((LENGTH, EMBED))
    inner_attention = keras_favor.FavorAttention(HEADS, KEY_DIM, num_random_features=FEATURES)
    inner = keras.Model(
        inner_inputs, inner_inputs + inner_attention(inner_inputs, inner_inputs), name="inner"
    )
    block = Block()
    deterministic = keras_favor.FavorAttention(HEADS, KEY_DIM, feature_map="elu")

    inputs = keras.Input((LENGTH, EMBED))
    hidden = block(inner(inputs))
    hidden = deterministic(hidden, hidden)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    return keras.Model(inputs, outputs), [inner_attention, block.attentions[0]]


def main(config):
    strategy = make_strategy(config["mode"])
    import keras

    import keras_favor

    def local_values(variable):
        # One entry per replica held by this process, read from each replica's own copy.
        return [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]

    class Probe(keras.callbacks.Callback):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers
            self.iterations, self.projections, self.counts = [], [], []

        def record(self):
            self.iterations.append(int(self.model.optimizer.iterations.numpy()))
            self.projections.append([local_values(x.projection_matrix) for x in self.layers])
            self.counts.append([local_values(x.redraw_count) for x in self.layers])

        def on_train_begin(self, logs=None):
            self.record()

        def on_train_batch_end(self, batch, logs=None):
            self.record()

    if config.get("set_random_seed", True):
        keras.utils.set_random_seed(0)
    with strategy.scope():
        model, layers = build_model()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss="mse",
            steps_per_execution=config["steps_per_execution"],
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, LENGTH, EMBED)).astype("float32")
    y = x.mean(axis=(1, 2))[:, None].astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(BATCH).with_options(options)

    if config["mode"] == "multiworker":
        work_around_keras_20585(model, strategy)
    redraw = keras_favor.RedrawRandomFeatures(
        every_n_steps=config["every_n_steps"], seed=config["seed"]
    )
    probe = Probe(layers)
    model.fit(
        dataset,
        steps_per_epoch=config["steps"],
        epochs=1,
        callbacks=[redraw, probe],
        shuffle=False,
        verbose=0,
    )

    batch = tf.constant(x[:BATCH])

    def forward():
        return model(batch, training=False)

    @tf.function
    def forward_on_every_replica():
        return strategy.run(forward)

    outputs = forward_on_every_replica()
    np.savez(
        config["out"],
        num_replicas=strategy.num_replicas_in_sync,
        iterations=np.array(probe.iterations),
        projections=np.array(probe.projections),  # (checks, layers, local replicas, M, H)
        counts=np.array(probe.counts),  # (checks, layers, local replicas)
        outputs=np.array([np.asarray(o) for o in strategy.experimental_local_results(outputs)]),
        num_redrawn=len(redraw.redrawn_layers),
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
