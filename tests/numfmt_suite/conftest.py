"""numfmt tests: register the slow references under unique module names.

The helper modules of this folder are loaded by path as ``numfmt_reference``
and ``numfmt_microxcaling_port`` so they can never clash with a same-named
helper of another test folder (pytest's default import mode puts every test
folder on sys.path).
"""
import importlib.util
import pathlib
import sys

_HERE = pathlib.Path(__file__).parent


def _load(name: str, filename: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / filename)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_ref = _load("numfmt_reference", "reference.py")
_load("numfmt_microxcaling_port", "microxcaling_port.py")



import numba
import pytest


@pytest.fixture
def one_numba_thread():
    """Run a test with one Numba thread (restored afterwards).

    The tests call numfmt on many tiny arrays; on a loaded 2-core machine a
    parallel launch per call costs milliseconds, so they run single-threaded.
    Results do not depend on the thread count (tested separately with 1 vs 2).
    """
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


# The shared hypothesis settings of these tests (derandomized, no deadline, no example
# database) as a named profile, for `pytest --hypothesis-profile=numfmt-ci` elsewhere.
# Not loaded globally: the numfmt tests apply it per test via @settings(ref.CI, ...).
from hypothesis import settings as _settings  # noqa: E402

_settings.register_profile("numfmt-ci", _ref.CI)
