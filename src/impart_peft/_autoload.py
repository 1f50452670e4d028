"""Register ImPart with PEFT when PEFT is imported, not when :mod:`impart_peft` is.

``import impart_peft`` must leave ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` able to read ImPart
adapters, but importing PEFT and transformers costs seconds that the pure math (:mod:`impart_peft.delta`,
allocation, masks, baselines) and ``impart --help`` do not need. So :func:`install` registers at once if PEFT is
already imported, and otherwise puts a finder first on ``sys.meta_path`` that wraps the loader of two modules and
acts right after each has finished executing:

* ``peft``: register the ``IMPART`` type, config and tuner with PEFT (:func:`impart_peft.registration.register`) and
  wrap ``PeftModel.save_pretrained`` / ``push_to_hub`` (:func:`impart_peft.hub.install_peft_hooks`);
* ``transformers.modeling_utils``: wrap ``load_adapter`` (:func:`impart_peft.hub.install_transformers_hooks`).

transformers' ``load_adapter`` imports PEFT itself, so the registration is in place before it reads the config.

When PEFT finishes importing *because* an impart_peft module imported it (``impart_peft.config`` does), that module
is only half executed and the registration, which needs it, cannot run yet: it is kept pending and runs as soon as
the outermost impart_peft module being imported has finished, before that import returns. Each action runs exactly
once; the finder removes itself when both have run.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable

__all__ = ["activations", "install"]

_PACKAGE = __name__.rpartition(".")[0]
_lock = threading.RLock()
_waiting: dict[str, Callable[[], None]] = {}  # module name -> action, the module not imported yet
_pending: list[tuple[str, Callable[[], None]]] = []  # imported, action not run yet
_depth = 0  # impart_peft modules executing now (imported after install)
_running = False
activations: list[str] = []  # the actions run, in order (each at most once)


def _register_with_peft() -> None:
    from .config import ImPartConfig
    from .hub import install_peft_hooks
    from .model import ImPartModel
    from .registration import register

    register(ImPartConfig, ImPartModel)
    install_peft_hooks()


def _wrap_transformers() -> None:
    from .hub import install_transformers_hooks

    install_transformers_hooks()


_ACTIONS: dict[str, Callable[[], None]] = {
    "peft": _register_with_peft,
    "transformers.modeling_utils": _wrap_transformers,
}


def _run_pending() -> None:
    """Run the pending actions, unless an impart_peft module is still executing (its end runs them) or they are
    running already (an action's own imports end here too)."""
    global _running
    while True:
        with _lock:
            if _running or _depth or not _pending:
                if not (_running or _waiting or _pending):
                    _uninstall()
                return
            _running = True
            name, action = _pending.pop(0)
        try:
            action()
            activations.append(name)
        finally:
            with _lock:
                _running = False


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then what the finished module calls for (see the module docstring)."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        global _depth
        # The module sees its real loader (importlib.resources and the like ask it).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        ours = self._name.startswith(_PACKAGE + ".")
        if ours:
            with _lock:
                _depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            if ours:
                with _lock:
                    _depth -= 1
        with _lock:
            action = _waiting.pop(self._name, None)
            if action is not None:
                _pending.append((self._name, action))
        _run_pending()

    def __getattr__(self, name: str):
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it and wraps the loader of the modules it watches."""

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        watched = fullname in _waiting or fullname.startswith(_PACKAGE + ".")
        if not watched or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec


_finder = _Finder()


def _uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install() -> None:
    """Arrange for each action to run once its module is imported (at once for those already imported)."""
    with _lock:
        if activations or _waiting or _pending:
            return  # installed already
        for name, action in _ACTIONS.items():
            module = sys.modules.get(name)
            initializing = getattr(getattr(module, "__spec__", None), "_initializing", False)
            if module is not None and not initializing:
                _pending.append((name, action))
            else:
                _waiting[name] = action
        if _waiting:
            sys.meta_path.insert(0, _finder)
    _run_pending()
