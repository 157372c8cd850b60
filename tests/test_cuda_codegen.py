"""What nvcc makes of the CUDA kernels, checked without a GPU: the PTX of cpp/cuda/*.cu compiled with
the options CMakeLists.txt gives the x2l_cuda target.

- no approximate tanh (tanh.approx.f32 is ~2^-11: GELU-tanh would miss its 1e-5 test by 70x) and no
  approximate division: what --use_fast_math would bring in behind the kernels' backs;

Skipped where nvcc is missing; the emulator (tests/cuda_emu) cannot see any of this.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = next((c for c in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc") if c and os.path.exists(c)),
            None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def cmake_cuda_flags() -> list[str]:
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    m = re.search(r"target_compile_options\(x2l_cuda PRIVATE \$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>\)", text)
    assert m, "CMakeLists.txt: no CUDA compile options for x2l_cuda"
    return m.group(1).split()


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, str]:
    """{source name: its PTX for sm_87 (Orin)}."""
    out = {}
    tmp = tmp_path_factory.mktemp("ptx")
    for name in ("ops", "kv_rotate", "attention", "matmul"):
        dst = tmp / f"{name}.ptx"
        r = subprocess.run([NVCC, "-std=c++17", *cmake_cuda_flags(), "-I", os.path.join(ROOT, "cpp"), "-arch=sm_87",
                            "-ptx", os.path.join(ROOT, "cpp", "cuda", f"{name}.cu"), "-o", str(dst)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = dst.read_text()
    return out


def test_no_global_fast_math():
    assert "--use_fast_math" not in cmake_cuda_flags() and "-use_fast_math" not in cmake_cuda_flags()


def _instructions(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("//", ".", "{", "}"))]


def test_no_approximate_tanh_or_division(ptx):
    for name, text in ptx.items():
        ins = _instructions(text)
        assert not [i for i in ins if i.startswith("tanh.approx")], f"{name}.cu: tanh.approx (fast-math tanhf)"
        assert not [i for i in ins if re.match(r"div\.(approx|full)\.f32", i)], f"{name}.cu: approximate division"

