"""InputError: an error about the user's input, raised on purpose.

The ``loraq`` command prints an ``InputError`` as one line and exits with code 2; any
other exception is a programming error and keeps its traceback. Code that reads or
checks the user's input (arguments, files, model directories, a layer's arguments) runs
inside ``reading_input()`` (or under the ``checks_input`` decorator), which re-raises the
``ValueError`` / ``TypeError`` / ``OSError`` kinds that such checks raise as an
``InputError`` of the same kind: a ``FileNotFoundError`` stays a ``FileNotFoundError``
(and a ``TypeError`` a ``TypeError``) for Python callers, and is also an ``InputError``.
Checks deeper in the work that are about the input (a rank that a layer cannot take,
inputs that do not fit the model) raise ``InputError`` themselves.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

__all__ = ["InputError", "reading_input", "checks_input"]

_INPUT_KINDS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
                IsADirectoryError, NotADirectoryError)


class InputError(ValueError):
    """An error caused by the user's input (see the module docstring)."""


# one InputError type per kind, defined here so that they pickle (Dask workers send them)
_KINDS = {ValueError: InputError}
for _cls in _INPUT_KINDS[1:]:
    _name = "Input" + _cls.__name__
    _KINDS[_cls] = type(_name, (_cls, InputError), {"__module__": __name__, "__qualname__": _name})
    globals()[_name] = _KINDS[_cls]


def _input_kind(cls: type) -> type:
    """The InputError type of the same kind as ``cls`` (cls itself when it is one)."""
    if issubclass(cls, InputError):
        return cls
    for kind in reversed(_INPUT_KINDS):  # the most specific kind first
        if issubclass(cls, kind):
            return _KINDS[kind]
    return InputError


@contextmanager
def reading_input():
    """Inside the block, the errors that input checks raise become ``InputError``s of the
    same kind."""
    try:
        yield
    except InputError:
        raise
    except _INPUT_KINDS as exc:
        err = _input_kind(type(exc))(*exc.args)
        raise err from None


def checks_input(fn):
    """Run ``fn`` inside ``reading_input()``: for functions that only check input."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with reading_input():
            return fn(*args, **kwargs)
    return wrapper
