"""x2l-edge: long-video question answering on small GPUs (Video-X²L bi-level KV compression)."""
from __future__ import annotations

import os as _os


def _load_native(name: str):
    # Developers may point X2L_CORE_PATH at a freshly built _core shared object (cmake build dir)
    # to test without reinstalling; the test module _testing is then taken from the same folder.
    # Installed packages import the bundled modules.
    dev_path = _os.environ.get("X2L_CORE_PATH")
    if dev_path:
        import glob
        import importlib.util
        import sys

        if name != "_core":
            found = sorted(glob.glob(_os.path.join(_os.path.dirname(dev_path), name + ".*")))
            if not found:
                raise ImportError(f"no {name} module next to X2L_CORE_PATH={dev_path}")
            dev_path = found[0]
        spec = importlib.util.spec_from_file_location("x2l_edge." + name, dev_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["x2l_edge." + name] = mod
        spec.loader.exec_module(mod)
        return mod
    import importlib

    return importlib.import_module("x2l_edge." + name)


def __getattr__(name: str):
    # x2l_edge._testing: the kernel probes of a test build (cmake X2L_TESTING=ON), loaded on first use.
    if name == "_testing":
        try:
            mod = _load_native("_testing")
        except ImportError as e:
            raise ImportError("x2l_edge._testing is built only by the test build: pip install "
                              "-C cmake.define.X2L_TESTING=ON '.[test]' (see the README)") from e
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'x2l_edge' has no attribute {name!r}")


def _source_tree_hint(e: ImportError) -> ImportError:
    # `import x2l_edge` inside a checkout finds this folder, which has the Python sources but not the
    # compiled _core: say what to do instead of a bare ModuleNotFoundError.
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if not _os.path.exists(_os.path.join(root, "pyproject.toml")):
        return e
    import glob

    built = sorted(glob.glob(_os.path.join(root, "build", "*", "_core.*")))
    point = (f"X2L_CORE_PATH={built[0]} (the build folder's module)" if built
             else "X2L_CORE_PATH at a built _core module (build/<wheel tag>/_core.*)")
    return ImportError(
        f"x2l_edge was imported from its source tree ({here}), which has no compiled _core module. "
        f"Install the package (pip install . -- see the README) and import it from outside {root}, "
        f"or set {point}.")


try:
    _core = _load_native("_core")
except ModuleNotFoundError as _e:
    if _e.name != "x2l_edge._core" or _os.environ.get("X2L_CORE_PATH"):
        raise
    raise _source_tree_hint(_e) from None
FormatError = _core.FormatError
BudgetError = _core.BudgetError
Error = _core.Error
CancelledError = _core.CancelledError
GGUFFile = _core.GGUFFile

__version__ = "0.1.0"

from .options import X2LOptions  # noqa: E402
from .session import Session  # noqa: E402
from .concurrency import CancelToken  # noqa: E402
from . import models  # noqa: E402
from . import video  # noqa: E402  (cv2 is imported lazily, on first file access)

__all__ = ["Session", "X2LOptions", "GGUFFile", "FormatError", "BudgetError", "Error", "CancelledError",
           "CancelToken", "models", "video"]
