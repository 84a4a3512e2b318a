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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise invalid(name, "a positive number", value)
    return value
