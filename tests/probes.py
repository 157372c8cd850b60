"""x2l_edge._testing for the tests: the kernel probes and speed entries of the test build
(pip install -C cmake.define.X2L_TESTING=ON ".[test]"; tests/cuda_emu/run.py builds it too).

Without it the tests that call it skip on a developer's machine and fail in CI (CI=1)."""
from __future__ import annotations

import os

import pytest


def _load():
    try:
        from x2l_edge import _testing
    except ImportError:
        if os.environ.get("CI"):
            raise
        return None
    return _testing


testing = _load()
needs_probes = pytest.mark.skipif(testing is None, reason="x2l_edge._testing is not built (X2L_TESTING=ON)")


def require():
    """The module, or a module-level skip when it was not built."""
    if testing is None:
        pytest.skip("x2l_edge._testing is not built (pip install -C cmake.define.X2L_TESTING=ON)",
                    allow_module_level=True)
    return testing
