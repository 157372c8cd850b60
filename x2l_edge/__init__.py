"""x2l-edge: long-video question answering on small GPUs (Video-X²L bi-level KV compression)."""
from __future__ import annotations

import os as _os


def _load_core():
    # Developers may point X2L_CORE_PATH at a freshly built _core shared object (cmake build dir)
    # to test without reinstalling; installed packages import the bundled one.
    dev_path = _os.environ.get("X2L_CORE_PATH")
    if dev_path:
        import importlib.util
        import sys

        spec = importlib.util.spec_from_file_location("x2l_edge._core", dev_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["x2l_edge._core"] = mod
        spec.loader.exec_module(mod)
        return mod
    from . import _core

    return _core


_core = _load_core()
FormatError = _core.FormatError
BudgetError = _core.BudgetError
Error = _core.Error
GGUFFile = _core.GGUFFile

__version__ = "0.1.0"

from .options import X2LOptions  # noqa: E402
from .session import Session  # noqa: E402
from . import models  # noqa: E402
from . import video  # noqa: E402  (cv2 is imported lazily, on first file access)

__all__ = ["Session", "X2LOptions", "GGUFFile", "FormatError", "BudgetError", "Error", "models", "video"]
