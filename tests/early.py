"""Self-contained slow work (a QEMU guest run) started as soon as the tests are collected.

A QEMU guest under TCG spends minutes on one core, mostly alone; the rest of the suite waits on
daemons, agents and PostgreSQL with a core to spare. A test module registers its guest run with
`register` at import; when the collected tests include that module, `start` (called by the
conftest once collection is done) runs it in a thread, and the module's tests go last, so the
guest boots while everything else runs. The module's fixture gets the outcome with `result`,
which waits for the thread and raises what the run raised.

Nothing of what a guest run does changes: the same function runs, only earlier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_runs: dict[str, Callable[[], Any]] = {}
_threads: dict[str, threading.Thread] = {}
_outcomes: dict[str, tuple[bool, Any]] = {}


def register(module: str, run: Callable[[], Any]) -> None:
    """Register `run` as `module`'s early work (module: the test module's __name__)."""
    _runs[module] = run


def registered(module: str) -> bool:
    return module in _runs


def start(modules: set[str]) -> None:
    """Start the registered runs of these modules, each in its own thread, once."""
    for module in sorted(modules & _runs.keys()):
        if module in _threads:
            continue
        thread = threading.Thread(target=_work, args=(module,), name=f"early:{module}", daemon=True)
        _threads[module] = thread
        thread.start()


def _work(module: str) -> None:
    try:
        _outcomes[module] = (True, _runs[module]())
    except BaseException as e:  # handed to the fixture, which raises it in the test
        _outcomes[module] = (False, e)


def result(module: str) -> Any:
    """The outcome of `module`'s run: started now if it was not started early, and waited for."""
    start({module})
    _threads[module].join()
    ok, value = _outcomes[module]
    if not ok:
        raise value
    return value
