"""Fault injection for the resume tests: ``python -c`` imports this module first, and the
process then kills itself with SIGKILL right after its N-th stored layer
(``LORAQ_TEST_KILL_AFTER``), so the interruption point is exact and no test races a
signal against the clock."""
from __future__ import annotations

import os
import signal

from analysis import store

_AFTER = int(os.environ["LORAQ_TEST_KILL_AFTER"])
_save = store.LayerStore.save
_count = 0


def _save_then_maybe_die(self, *args, **kwargs):
    global _count
    _save(self, *args, **kwargs)
    _count += 1
    if _count == _AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


store.LayerStore.save = _save_then_maybe_die

# python -c "import kill_hook; kill_hook.main()" quantize ...: run the CLI on sys.argv[1:]


def main() -> None:
    import sys

    from analysis.cli import main as cli

    sys.exit(cli(sys.argv[1:]))
