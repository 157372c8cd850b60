"""What nvcc makes of the CUDA kernels, checked without a GPU: the PTX of cpp/cuda/*.cu compiled with
the options CMakeLists.txt gives the x2l_cuda target.

- no approximate tanh (tanh.approx.f32 is ~2^-11: GELU-tanh would miss its 1e-5 test by 70x) and no
  approximate division: what --use_fast_math would bring in behind the kernels' backs;
- no FP64 arithmetic (1/64 rate on RTX 40xx and Jetson Orin): RoPE and the X²L re-rotation run in FP32;
- sin.approx only where the argument was reduced to [-pi, pi] first (rope_sincos in common.cuh).

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


def test_no_fp64_arithmetic(ptx):
    for name, text in ptx.items():
        f64 = [i for i in _instructions(text) if re.match(r"[a-z0-9.]+\.f64\b", i.split()[0])]
        assert not f64, f"{name}.cu: FP64 instructions, e.g. {f64[:3]}"


def test_rope_kernels_use_reduced_sincos(ptx):
    # rope_kernel and rerotate_kernel: the SFU sine/cosine (on an argument reduced mod 2pi), no sincosf
    # slow path (Payne-Hanek reduction, FP64 and a local-memory table).
    for name in ("ops", "kv_rotate"):
        ins = _instructions(ptx[name])
        assert any(i.startswith("sin.approx.f32") for i in ins) and any(i.startswith("cos.approx.f32") for i in ins), name
