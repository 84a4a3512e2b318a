"""`RedrawRandomFeatures`: redraws the random projections of FAVOR attention layers in training."""

import hashlib
import logging
import warnings

import keras
import numpy as np

from keras_favor._checks import invalid, is_int, positive_int
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.ops.random_features import derive_seed

_logger = logging.getLogger(__name__)


def redraw_seed(seed, redraw_index, layer_index):
    """The seed of redraw number `redraw_index` of layer number `layer_index`.

    A pure function of its three integers (a keyed BLAKE2b hash, not Python's salted `hash`), so
    every process of a multi-worker job and every resumed run derives the same seeds.

    Args:
        seed: the callback's base seed, an int.
        redraw_index: i ≥ 1, the layer's `redraw_count` after the redraw.
        layer_index: j ≥ 0, the position of the layer among the redrawn layers.

    Returns:
        An int in [0, 2**31).
    """
    return derive_seed(seed, int(redraw_index), int(layer_index))


def _walk_layers(layer, seen, found):
    # Depth-first, in the order each layer tracks its sublayers: sub-models, custom layers holding
    # layers (attributes, lists, dicts) and functional blocks alike; shared layers once.
    if id(layer) in seen:
        return
    seen.add(id(layer))
    found.append(layer)
    for sublayer in getattr(layer, "_layers", None) or ():
        _walk_layers(sublayer, seen, found)


class RedrawRandomFeatures(keras.callbacks.Callback):
    """Redraws the random features of `FavorAttention` layers on a schedule during training.

    FAVOR+ estimates softmax attention with one random projection ω per layer. Training with a
    single fixed ω lets the model fit that ω's errors; redrawing ω from time to time (the Performer
    paper redraws during training) averages them out. Each redraw calls the layer's
    `redraw_random_features(seed)` from this callback, outside the compiled train step, so that
    under `tf.distribute` strategies every replica and every worker assigns the same new value.

    Which layers: every `FavorAttention` in the model, however deeply nested (sub-models, custom
    layers holding layers, functional blocks), or those in `layers`. Layers whose feature map uses
    no random features (e.g. `"elu"`) are skipped.

    When: a redraw happens before the step that needs it, never after the last step of `fit`, so the
    trained model holds the projection its last step trained with. With `every_n_steps=n`, step i
    (counted from 0 by `model.optimizer.iterations`) trains with redraw ⌊i / n⌋. Keras calls batch
    callbacks once per execution of `steps_per_execution=s` steps, so each execution trains with the
    redraw due at its first step: exact when every multiple of n starts an execution (s divides n
    and the epochs' lengths); otherwise a warning says so. On TensorFlow, data of unknown length
    (generators, `tf.data` with `filter`) ends every epoch with an execution that finds no data yet
    may add 1 to `optimizer.iterations`: the callback undoes its redraw and that increment, so steps
    are real steps (list it before callbacks that save the model at the end of an epoch). With
    `every_n_epochs=n`, a redraw falls due at the end of every n-th epoch (epochs numbered as `fit`
    numbers them, from `initial_epoch`, so pass it when resuming) and happens at the start of the
    next epoch, in the same `fit` call or in the next one made with the same callback. Nothing is
    ever redrawn during `evaluate` or `predict`, nor by the validation inside `fit`.

    State and resuming: the schedule lives in the model, not in the callback. Each layer's
    `redraw_count` weight (saved in `.keras` files and checkpoints, like the optimizer's iteration
    count) holds, in step mode, ⌊i / n⌋ for the first step i of the last execution (the number of
    redraws when s divides n), in epoch mode the number of redraws. The projection after redraw i of
    layer j is drawn with seed `redraw_seed(seed, i, j)`. When `fit` starts, before its first step,
    a layer whose count lags behind the schedule is redrawn at once to catch up: to ⌊iterations / n⌋
    in step mode; in epoch mode to ⌊initial_epoch / n⌋, or by the redraw left pending by the
    previous `fit` call of this callback. So a model saved after `fit` or by `ModelCheckpoint` holds
    the projection it last trained with, and a run resumed from it (with the same `seed`, and
    `initial_epoch` in epoch mode) continues with the same schedule and the same projections as an
    uninterrupted run. A new callback in epoch mode knows the schedule only from `initial_epoch`: a
    `fit` call without it starts counting epochs afresh. Layers are numbered j = 0, 1, ... in the
    order the model tracks them (or the order of `layers`), which is the same in every process
    running the same model code.

    Args:
        every_n_steps: redraw every this many optimizer steps, a positive int. Exactly one of
            `every_n_steps` and `every_n_epochs` must be given.
        every_n_epochs: redraw after every this many epochs (at the start of the next one), a
            positive int.
        layers: the `FavorAttention` layers to redraw (a layer or a list of them), or None (the
            default) for every `FavorAttention` in the model.
        seed: an int that fixes every redrawn projection (see above). With None, the base seed is
            derived from the layers' projections when the first redraw happens: random when the
            layers' own seeds are None, reproducible when they are fixed, and identical on every
            replica and worker, which hold the same projections (so `MultiWorkerMirroredStrategy`
            works without a seed). Pass an int to make a resumed run draw the projections of an
            uninterrupted one.
        verbose: 0 (the default) is silent; 1 logs each redraw with the number of steps (or
            epochs) done before it and the number of layers redrawn.

    Example:

    >>> import keras, numpy as np, keras_favor
    >>> inputs = keras.Input((8, 16))
    >>> attention = keras_favor.FavorAttention(num_heads=2, key_dim=8, num_random_features=16)
    >>> outputs = keras.layers.Dense(1)(attention(inputs, inputs))
    >>> model = keras.Model(inputs, outputs)
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.ones((8, 8, 16)), np.zeros((8, 8, 1))
    >>> redraw = keras_favor.RedrawRandomFeatures(every_n_steps=2, seed=0)
    >>> _ = model.fit(x, y, batch_size=2, epochs=1, callbacks=[redraw], verbose=0)
    >>> int(attention.redraw_count)  # 4 steps: redrawn before step 2 (counted from 0), not after 3
    1

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794 (section 4:
        redrawing the random features during training).
    """

    def __init__(self, every_n_steps=None, every_n_epochs=None, layers=None, seed=None, verbose=0):
        positive_int(every_n_steps, "every_n_steps", allow_none=True)
        positive_int(every_n_epochs, "every_n_epochs", allow_none=True)
        if (every_n_steps is None) == (every_n_epochs is None):
            raise ValueError(
                "Exactly one of the arguments `every_n_steps` and `every_n_epochs` must be a "
                f"positive integer. Received: every_n_steps={every_n_steps!r}, "
                f"every_n_epochs={every_n_epochs!r}"
            )
        if seed is not None and not is_int(seed):
            raise invalid("seed", "an integer or None", seed)
        if not is_int(verbose) or verbose < 0:
            raise invalid("verbose", "a non-negative integer", verbose)
        if layers is not None:
            if isinstance(layers, FavorAttention):
                layers = [layers]
            elif isinstance(layers, (list, tuple)) and layers:
                layers = list(layers)
            else:
                raise invalid(
                    "layers", "None, a `FavorAttention` layer or a non-empty list of them", layers
                )
            bad = [layer for layer in layers if not isinstance(layer, FavorAttention)]
            if bad:
                raise invalid("layers", f"`FavorAttention` layers only (not {bad[0]!r})", layers)
        super().__init__()
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.layers = layers
        self.seed = seed
        self.verbose = verbose
        self._base_seed = seed
        self._layers_to_redraw = []
        self._last_due = None  # step mode: ⌊iterations / n⌋ at the last check
        self._running = None  # step mode: what the execution that started last changed
        self._warned = False  # step mode: the schedule's inexactness was reported in this fit
        self._epoch_redraw_pending = False  # epoch mode: due at the end of the last epoch
        self._first_epoch_of_fit = True

    @property
    def redrawn_layers(self):
        """The layers this callback redraws, in index order j (set when training starts)."""
        return list(self._layers_to_redraw)

    # Which layers.

    def _find_layers(self, model):
        if self.layers is not None:
            candidates = self.layers
        else:
            found = []
            _walk_layers(model, set(), found)
            candidates = [layer for layer in found if isinstance(layer, FavorAttention)]
        return [layer for layer in candidates if layer.feature_map.uses_random_features]

    # When.

    def on_train_begin(self, logs=None):
        self._layers_to_redraw = self._find_layers(self.model)
        if not self._layers_to_redraw:
            warnings.warn(
                "RedrawRandomFeatures found no `FavorAttention` layer with random features to "
                "redraw; it will do nothing.",
                stacklevel=2,
            )
        self._last_due = None  # the first check, before the first step, catches up
        self._running = None
        self._first_epoch_of_fit = True
        self._warned = False
        if self.every_n_steps is not None:
            self._warn_if_executions_straddle_redraws()

    def on_train_batch_begin(self, batch, logs=None):
        # Keras always runs `on_train_batch_begin` synchronously, so a redraw is complete before
        # the step starts; on JAX, `self.model` syncs the trainer's state into the variables and
        # the trainer reads them back before the step.
        if self.every_n_steps is None:
            return
        iterations = int(_read(self.model.optimizer.iterations))
        self._running = (iterations, self._last_due, [])
        self._check_steps(iterations)

    def on_train_batch_end(self, batch, logs=None):
        self._running = None  # the execution ran

    def on_test_begin(self, logs=None):
        # The validation inside `fit` comes before `on_epoch_end`.
        self._undo_execution_that_found_no_data()

    def on_epoch_begin(self, epoch, logs=None):
        if self.every_n_epochs is None:
            return
        # `fit` tells callbacks its `initial_epoch` only here, with its first epoch.
        due = epoch // self.every_n_epochs if self._first_epoch_of_fit else 0
        pending = self._epoch_redraw_pending
        self._first_epoch_of_fit = False
        self._epoch_redraw_pending = False
        self._redraw(self._plan(pending, due), f"after {_plural(epoch, 'epoch')}")

    def on_epoch_end(self, epoch, logs=None):
        self._undo_execution_that_found_no_data()
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            self._epoch_redraw_pending = True

    def _check_steps(self, iterations):
        n = self.every_n_steps
        due = iterations // n
        crossed = self._last_due is not None and due > self._last_due
        starting = self._last_due is None
        self._last_due = due
        if not (crossed or starting):
            return
        if crossed and iterations % n and not self._warned:
            self._warned = True
            warnings.warn(
                f"RedrawRandomFeatures(every_n_steps={n}): the redraw due before step {due * n} "
                f"happens before step {iterations}, where the next execution starts: executions "
                f"of steps_per_execution={self.model.steps_per_execution} steps restart with each "
                "epoch and each `fit`, so one that ends elsewhere than on a multiple moves them.",
                stacklevel=2,
            )
        # Reached a multiple: redraw. At the start of training: catch up with the schedule.
        self._redraw(self._plan(crossed, due), f"after {_plural(iterations, 'step')}")

    def _warn_if_executions_straddle_redraws(self):
        n, s = self.every_n_steps, self.model.steps_per_execution
        if n % s == 0:
            return
        self._warned = True
        due = [k * n for k in range(1, 5)]
        done = [-(-step // s) * s for step in due]  # the first execution start at or after it
        warnings.warn(
            f"RedrawRandomFeatures(every_n_steps={n}) cannot redraw on schedule with "
            f"steps_per_execution={s}: the features change only when an execution starts, so "
            "each execution trains with the redraw due at its first step. Redraws due before "
            f"steps {', '.join(map(str, due))}, ... happen before steps "
            f"{', '.join(map(str, done))}, ...{' (some are skipped)' if n < s else ''}. Make "
            "`every_n_steps` a multiple of `steps_per_execution` for an exact schedule.",
            stacklevel=2,
        )

    def _undo_execution_that_found_no_data(self):
        # On TensorFlow, with data of unknown length, `fit` ends each epoch by calling
        # `on_train_batch_begin` for an execution that finds no data: it never calls
        # `on_train_batch_end`, but the step may still have added 1 to `optimizer.iterations`.
        if self._running is None:
            return
        iterations, self._last_due, redrawn = self._running
        self._running = None
        for layer, projection, count in redrawn:
            layer.projection_matrix.assign(projection)
            layer.redraw_count.assign(count)
        if int(_read(self.model.optimizer.iterations)) != iterations:
            self.model.optimizer.iterations.assign(iterations)
        if redrawn and self.verbose:
            self._log(
                f"RedrawRandomFeatures: the execution after {_plural(iterations, 'step')} found "
                "no data: undid its redraw."
            )

    def _plan(self, force, due):
        """(layer, new redraw count) for each built layer that must redraw now.

        A layer redraws when `force` is set or its count is behind `due`, the count the schedule
        has reached; the new count follows the schedule and only ever grows.
        """
        plan = []
        for layer in self._layers_to_redraw:
            if not _is_built(layer):
                continue
            count = _redraw_count(layer)
            if force or count < due:
                plan.append((layer, max(count + 1, due)))
        return plan

    # How.

    def _redraw(self, plan, when):
        if not plan:
            return
        base_seed = self._get_base_seed()
        for layer, new_count in plan:
            layer_index = self._index_of(layer)
            old_count = _redraw_count(layer)
            if self._running is not None:
                self._running[2].append(
                    (layer, np.array(_read(layer.projection_matrix)), old_count)
                )
            layer.redraw_random_features(seed=redraw_seed(base_seed, new_count, layer_index))
            if new_count != old_count + 1:
                layer.redraw_count.assign(new_count)
        if self.verbose:
            noun = "layer" if len(plan) == 1 else "layers"
            self._log(
                f"RedrawRandomFeatures: {when}: redrew the random features of {len(plan)} {noun}."
            )

    def _index_of(self, layer):
        for index, candidate in enumerate(self._layers_to_redraw):
            if candidate is layer:
                return index
        raise ValueError(f"Layer {layer.name!r} is not redrawn by this callback.")

    def _get_base_seed(self):
        if self._base_seed is None:
            # Every replica and worker holds the same projections, so they all derive the same
            # base seed; it is as random as the projections are.
            digest = hashlib.blake2b(digest_size=8, person=b"kf-base")
            for layer in self._layers_to_redraw:
                if _is_built(layer):
                    digest.update(_read(layer.projection_matrix).tobytes())
            self._base_seed = int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF
        return self._base_seed

    def _log(self, message):
        if keras.utils.is_interactive_logging_enabled():
            print(message, flush=True)
        else:
            _logger.info(message)


def _plural(number, noun):
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _is_built(layer):
    return getattr(layer, "projection_matrix", None) is not None


def _read(variable):
    # A variable's value as numpy on every backend, also a tf.distribute variable (read in
    # cross-replica context), and without the warning `ops.convert_to_numpy` gives there.
    value = variable.value
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _redraw_count(layer):
    return int(_read(layer.redraw_count))
