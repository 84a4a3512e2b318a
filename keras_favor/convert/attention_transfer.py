"""attention_transfer: train learnable feature maps to reproduce softmax attention, layer by layer.

Shape legend: B batch, T query length, E_out attention output width.
"""

import contextlib

import keras
from keras import ops

from keras_favor._checks import invalid, positive_int
from keras_favor.layers.favor_attention import FavorAttention


def attention_layers(model, kind):
    """The layers of `model` that are instances of `kind`, nested ones included, in model order."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind)]


def _describe(layers):
    return [
        f"{layer.name} ({type(layer).__name__}, num_heads={layer.num_heads}, "
        f"key_dim={layer.key_dim}, value_dim={layer.value_dim})"
        for layer in layers
    ]


def _map_weights(layer):
    """The trainable weights a FavorAttention owns itself (its map's), not its projections'."""
    sublayers = {
        id(w) for sub in layer._flatten_layers(include_self=False) for w in sub.trainable_weights
    }
    return [w for w in layer.trainable_weights if id(w) not in sublayers]


def _pair_layers(favor_model, softmax_model):
    teachers = [
        layer
        for layer in attention_layers(softmax_model, keras.layers.MultiHeadAttention)
        if not isinstance(layer, FavorAttention)  # should it ever subclass MultiHeadAttention
    ]
    students = attention_layers(favor_model, FavorAttention)
    same = len(teachers) == len(students) and all(
        (t.num_heads, t.key_dim, t.value_dim) == (s.num_heads, s.key_dim, s.value_dim)
        for t, s in zip(teachers, students)
    )
    if not teachers or not same:
        raise ValueError(
            "attention_transfer needs the FavorAttention layers of `favor_model` and the "
            "MultiHeadAttention layers of `softmax_model` to correspond one to one, in order, with "
            "the same heads and sizes (as `to_favor` makes them). "
            f"Received: favor_model layers {_describe(students)}, "
            f"softmax_model layers {_describe(teachers)}"
        )
    untrainable = [s for s in students if not _map_weights(s)]
    if untrainable:
        raise ValueError(
            "attention_transfer trains the feature maps' own weights, and these FAVOR layers "
            "have none (or are frozen): use a learnable map such as feature_map='hedgehog'. "
            f"Received: {', '.join(f'{s.name}: feature_map={s.feature_map!r}' for s in untrainable)}"
        )
    return list(zip(teachers, students))


class _Recorder:
    """While active, each watched layer's calls append (args, kwargs, output) to `calls[layer]`.

    A plain object (not a dict), so that Keras' attribute tracking leaves the lists as they are.
    """

    def __init__(self, layers):
        self.layers = layers
        self.calls = {id(layer): [] for layer in layers}

    def __enter__(self):
        for layer in self.layers:
            original = layer.call

            def call(*args, _original=original, _calls=self.calls[id(layer)], **kwargs):
                output = _original(*args, **kwargs)
                _calls.append((args, kwargs, output))
                return output

            object.__setattr__(layer, "call", call)
        return self

    def __exit__(self, *exc_info):
        for layer in self.layers:
            object.__delattr__(layer, "call")


@contextlib.contextmanager
def _only_maps_trainable(softmax_model, students):
    """Freezes the softmax model and every sub-layer of the students (their projections)."""
    layers = [softmax_model] + [
        sub for student in students for sub in student._flatten_layers(include_self=False)
    ]
    flags = [layer.trainable for layer in layers]
    try:
        for layer in layers:
            layer.trainable = False
        yield
    finally:
        for layer, flag in zip(layers, flags):
            layer.trainable = flag


def _frozen(x):
    if hasattr(x, "dtype") and hasattr(x, "shape") and "float" in str(x.dtype):
        return ops.stop_gradient(x)
    return x


class _TransferModel(keras.Model):
    """Runs the softmax model and, on each attention layer's own inputs, its FAVOR counterpart.

    `call` returns, per layer pair, (FAVOR output, softmax output, query mask or None); the loss
    is the sum over layers of the mean squared error over real query positions.
    """

    def __init__(self, softmax_model, pairs, recorder, **kwargs):
        super().__init__(**kwargs)
        self.softmax_model = softmax_model
        self.students = [student for _, student in pairs]
        self._recorder = recorder

    def call(self, inputs):
        # The softmax layers are not tracked again here (they are in `softmax_model`): each
        # variable must appear once in the model's state (JAX donates every buffer once).
        teachers = self._recorder.layers
        for teacher in teachers:
            self._recorder.calls[id(teacher)].clear()
        self.softmax_model(inputs, training=False)
        outputs = []
        for teacher, student in zip(teachers, self.students):
            calls = self._recorder.calls[id(teacher)]
            if len(calls) != 1:
                raise ValueError(
                    f"attention_transfer needs each softmax attention layer called once per "
                    f"forward pass. Received: {len(calls)} calls of layer '{teacher.name}'"
                )
            args, kwargs, target = calls[0]
            if isinstance(target, (tuple, list)):  # (output, scores)
                target = target[0]
            args = [_frozen(a) for a in args]
            kwargs = {k: _frozen(v) for k, v in kwargs.items()}
            kwargs.update(training=False, return_attention_scores=False)
            output = student(*args, **kwargs)  # (B, T, E_out)
            outputs.append((output, ops.stop_gradient(target), kwargs.get("query_mask")))
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        total = 0.0
        for output, target, query_mask in y_pred:
            error = ops.cast(output, "float32") - ops.cast(target, "float32")
            error = ops.mean(ops.square(error), axis=tuple(range(2, len(error.shape))))  # (B, T)
            if query_mask is None:
                total = total + ops.mean(error)
            else:
                weight = ops.cast(query_mask, "float32")
                total = total + ops.sum(error * weight) / ops.maximum(ops.sum(weight), 1.0)
        return total


def _first_batch(data, batch_size):
    """The inputs x of the first batch of `data`, for a check before training."""
    if isinstance(data, keras.utils.PyDataset):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data[0])
        return x
    if hasattr(data, "element_spec"):  # a tf.data.Dataset
        x, _, _ = keras.utils.unpack_x_y_sample_weight(next(iter(data)))
        return x
    return keras.tree.map_structure(lambda a: a[: batch_size or 32], data)


def _check_data(data, batch_size, models):
    try:
        batch = _first_batch(data, batch_size)
    except Exception as error:
        raise ValueError(
            "Argument `data` must be model inputs (arrays, a dict or list of arrays), a "
            f"tf.data.Dataset or a keras.utils.PyDataset ({error}). Received: data={data!r:.200}"
        ) from error
    shapes = keras.tree.map_structure(lambda a: tuple(getattr(a, "shape", ())), batch)
    for name, model in models:
        try:
            model(batch, training=False)
        except Exception as error:
            raise ValueError(
                f"`{name}` does not accept the inputs in `data` ({type(error).__name__}: "
                f"{error}). Expected inputs like {model.inputs}. Received: data with shapes "
                f"{shapes}"
            ) from error


def attention_transfer(
    favor_model,
    softmax_model,
    data,
    epochs=1,
    *,
    batch_size=None,
    steps_per_epoch=None,
    learning_rate=1e-2,
    optimizer=None,
    callbacks=None,
    verbose="auto",
):
    """Trains the feature maps of `favor_model` to reproduce the attention of `softmax_model`.

    Attention transfer (Hedgehog; LoLCATs' first stage): each `FavorAttention` of `favor_model`
    is paired, in order, with the `keras.layers.MultiHeadAttention` of `softmax_model` it
    replaced (as `to_favor` makes them). On every batch, the softmax model runs on `data`; each
    FAVOR layer then runs on the very inputs (and masks, and `use_causal_mask`) its softmax
    counterpart received, and the loss is the sum over layers of the mean squared difference
    of the two attention outputs, over real query positions. Only the feature maps' own weights
    train (e.g. `feature_map="hedgehog"`); the projections, the rest of `favor_model` and
    `softmax_model` are left as they are. Runs Keras `fit` on a small wrapper model (progress
    bar, callbacks and history included) on any backend. Fine-tuning end to end afterwards is
    ordinary `favor_model.fit`.

    Args:
        favor_model: the model whose FAVOR feature maps train (e.g. `to_favor(softmax_model,
            feature_map="hedgehog")`).
        softmax_model: the model with exact attention whose attention is the target.
        data: the inputs of `softmax_model`: arrays (or a dict / list of arrays), a
            `tf.data.Dataset` or a `keras.utils.PyDataset` yielding inputs or (inputs, targets)
            (targets are ignored).
        epochs: passes over `data`, a positive int.
        batch_size: batch size for array data (Keras' default, 32, when None).
        steps_per_epoch: as in `fit`.
        learning_rate: Adam's learning rate, when `optimizer` is None.
        optimizer: a Keras optimizer (or name); default Adam(`learning_rate`).
        callbacks: Keras callbacks for `fit`.
        verbose: as in `fit` ("auto": a progress bar).

    Returns:
        The Keras `History` of the transfer (`history.history["loss"]` per epoch).

    Raises:
        ValueError: when the attention layers do not correspond one to one (both sides are
            listed), when the FAVOR layers have no trainable feature-map weights, or when
            `data` does not fit the models (before any training step).

    Example:

    >>> import keras, numpy as np
    >>> from keras_favor.convert import to_favor
    >>> x = keras.Input((None, 16))
    >>> softmax = keras.Model(x, keras.layers.MultiHeadAttention(2, 8)(x, x))
    >>> favor = to_favor(softmax, feature_map="hedgehog", seed=0)
    >>> data = np.random.rand(8, 12, 16).astype("float32")
    >>> history = attention_transfer(favor, softmax, data, epochs=2, verbose=0)
    >>> len(history.history["loss"])
    2

    References:
        Zhang et al., The Hedgehog & the Porcupine, arXiv 2402.04347.
        Zhang et al., LoLCATs: On Low-Rank Linearizing of Large Language Models, arXiv 2410.10254.
    """
    for name, model in (("favor_model", favor_model), ("softmax_model", softmax_model)):
        if not isinstance(model, keras.Model):
            raise invalid(name, "a keras.Model", model)
    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size", allow_none=True)
    pairs = _pair_layers(favor_model, softmax_model)
    _check_data(data, batch_size, (("softmax_model", softmax_model), ("favor_model", favor_model)))
    if optimizer is None:
        optimizer = keras.optimizers.Adam(learning_rate)
    students = [student for _, student in pairs]
    with _Recorder([teacher for teacher, _ in pairs]) as recorder:
        with _only_maps_trainable(softmax_model, students):
            wrapper = _TransferModel(softmax_model, pairs, recorder, name="attention_transfer")
            wrapper.compile(optimizer=optimizer)
            fit_kwargs = {} if batch_size is None else {"batch_size": batch_size}
            return wrapper.fit(
                data,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                callbacks=callbacks,
                verbose=verbose,
                **fit_kwargs,
            )
