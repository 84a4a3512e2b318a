"""Feature maps φ for FAVOR attention, and `get` / `serialize` / `deserialize`."""

import keras

from keras_favor._checks import invalid
from keras_favor.feature_maps.elu import ELU
from keras_favor.feature_maps.feature_map import ExponentialFeatureMap, FeatureMap
from keras_favor.feature_maps.hedgehog import Hedgehog
from keras_favor.feature_maps.relu import ReLU
from keras_favor.feature_maps.softmax_hyperbolic import SoftmaxHyperbolic
from keras_favor.feature_maps.softmax_optimal import SoftmaxOptimal
from keras_favor.feature_maps.softmax_positive import SoftmaxPositive
from keras_favor.feature_maps.softmax_trig import SoftmaxTrig

__all__ = [
    "ELU",
    "ExponentialFeatureMap",
    "FeatureMap",
    "Hedgehog",
    "ReLU",
    "SoftmaxHyperbolic",
    "SoftmaxOptimal",
    "SoftmaxPositive",
    "SoftmaxTrig",
    "deserialize",
    "get",
    "serialize",
]

ALIASES = {
    "softmax_positive": SoftmaxPositive,
    "softmax_hyperbolic": SoftmaxHyperbolic,
    "softmax_trig": SoftmaxTrig,
    "softmax_optimal": SoftmaxOptimal,
    "relu": ReLU,
    "elu": ELU,
    "hedgehog": Hedgehog,
}

_MODULE_OBJECTS = {cls.__name__: cls for cls in ALIASES.values()}


def serialize(feature_map):
    """A JSON-able config of a feature map (registered user maps included)."""
    return keras.saving.serialize_keras_object(feature_map)


def deserialize(config, custom_objects=None):
    """The feature map described by `config` (from `serialize`, or a string name)."""
    if isinstance(config, str) and config in ALIASES:
        return ALIASES[config]()
    return keras.saving.deserialize_keras_object(
        config, module_objects=_MODULE_OBJECTS, custom_objects=custom_objects
    )


def get(identifier):
    """A `FeatureMap` from a string name, a config dict or an instance.

    Names: ``"softmax_positive"``, ``"softmax_hyperbolic"``, ``"softmax_trig"``,
    ``"softmax_optimal"``, ``"relu"``, ``"elu"``, ``"hedgehog"`` (learnable).
    """
    if isinstance(identifier, FeatureMap):
        return identifier
    if isinstance(identifier, str):
        if identifier in ALIASES:
            return ALIASES[identifier]()
        raise invalid(
            "feature_map",
            f"one of {sorted(ALIASES)}, a config dict or a FeatureMap instance",
            identifier,
        )
    if isinstance(identifier, dict):
        obj = deserialize(identifier)
        if isinstance(obj, FeatureMap):
            return obj
    raise invalid("feature_map", "a name, a config dict or a FeatureMap instance", identifier)
