"""Argument checks shared by the whole package: each raises a ValueError naming the argument and
echoing the value received."""


def invalid(name, expected, value):
    """The ValueError for argument `name`: what was `expected` and what was received."""
    return ValueError(
        f"Received an invalid value for argument `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def is_int(value):
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value, name, allow_none=False):
    """`value` if it is a positive int (or None, with `allow_none`); else a ValueError."""
    if allow_none and value is None:
        return value
    if not is_int(value) or value <= 0:
        expected = "None or a positive integer" if allow_none else "a positive integer"
        raise invalid(name, expected, value)
    return value


def positive_number(value, name):
    """`value` if it is a positive int or float (not a bool); else a ValueError."""
    if not is_number(value) or value <= 0:
        raise invalid(name, "a positive number", value)
    return value


def non_negative_number(value, name, allow_none=False):
    """`value` if it is an int or float ≥ 0 (or None, with `allow_none`); else a ValueError."""
    if allow_none and value is None:
        return value
    if not is_number(value) or value < 0:
        expected = "None or a non-negative number" if allow_none else "a non-negative number"
        raise invalid(name, expected, value)
    return value


def seed(value, name="seed"):
    """`value` if it is None or a non-negative int; else a ValueError."""
    if value is not None and (not is_int(value) or value < 0):
        raise invalid(name, "None or a non-negative integer", value)
    return value


def boolean(value, name):
    """`value` if it is a bool; else a ValueError."""
    if not isinstance(value, bool):
        raise invalid(name, "a bool", value)
    return value


def rate(value, name):
    """`value` as a float if it is a number in [0, 1); else a ValueError."""
    if not is_number(value) or not 0 <= value < 1:
        raise invalid(name, "a number in [0, 1)", value)
    return float(value)


def one_of(value, choices, name):
    """`value` if it is one of `choices` (strings or None); else a ValueError listing them."""
    if not (value is None or isinstance(value, str)) or value not in choices:
        raise invalid(name, f"one of {tuple(choices)}", value)
    return value


def keras_object(module, identifier, name, what):
    """`module.get(identifier)` (e.g. `keras.initializers`); a ValueError naming `name` if it
    fails, with `what` was expected and Keras' reason."""
    try:
        return module.get(identifier)
    except (ValueError, TypeError) as error:
        raise invalid(name, f"{what} ({error})", identifier) from error
