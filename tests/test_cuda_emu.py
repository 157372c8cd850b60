"""The CUDA emulator (tests/cuda_emu) against small CUDA programs with planted bugs.

The emulator runs the CUDA backend's sources on the CPU so that machines without a GPU execute them
(`X2L_CUDA=EMU` builds, see the README). That is only worth something if it exposes the bugs a GPU
would: a missing __syncthreads(), a missing event wait between streams, a host dereference of device
memory, an out-of-bounds read, a warp shuffle after lanes exited, a launch over the shared-memory
limit, work a stream capture cannot hold. Each case here is a program with one such bug (or none), compiled with the emulator.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EMU = Path(__file__).parent / "cuda_emu"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(not CXX or not sys.platform.startswith("linux"), reason="needs a C++ compiler on Linux")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda_emu")
    gen = out / "selftest.cpp"
    subprocess.run([sys.executable, str(EMU / "cu2cpp.py"), str(EMU / "selftest.cu"), str(gen)], check=True)
    exe = out / "selftest"
    cmd = [CXX, "-std=c++17", "-O1", "-I", str(EMU / "include"), str(gen), str(EMU / "emu_runtime.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def run(exe: Path, case: str, stdin: str = "", **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("X2L_EMU_")}
    e.update({k: str(v) for k, v in env.items()})
    return subprocess.run([str(exe), case], input=stdin, capture_output=True, text=True, timeout=60, env=e)


def test_launch_rewrite():
    sys.path.insert(0, str(EMU))
    try:
        from cu2cpp import convert
    finally:
        sys.path.pop(0)
    src = "k<T><<<g, b, s, st>>>(a,\n  c);\nz<<<1, 2>>>();\nextern __shared__ float smem[];\n"
    out = convert(src, "x.cu")
    assert '::x2l_emu::Launch(g, b, s, st).run("k<T>", k<T>, a,\n  c);' in out
    assert '::x2l_emu::Launch(1, 2).run("z", z);' in out
    assert "float* smem = static_cast<float*>(::x2l_emu::dynamic_smem());" in out
    assert out.count("\n") == src.count("\n") + 1  # the #line directive; every .cu line keeps its number


@pytest.mark.parametrize("order", ["0", "1"])
def test_block_reduction(selftest, order):
    r = run(selftest, "reduce", X2L_EMU_ORDER=order)
    assert r.returncode == 0, r.stdout + r.stderr
    got, want = r.stdout.split()[1], r.stdout.split()[3]
    assert float(got) == float(want)


def test_missing_syncthreads_is_exposed(selftest):
    sums = []
    for order in ("0", "1"):
        r = run(selftest, "reduce_racy", X2L_EMU_ORDER=order)
        assert r.returncode == 0, r.stdout + r.stderr
        sums.append((float(r.stdout.split()[1]), float(r.stdout.split()[3])))
    assert any(not got == want for got, want in sums), sums  # NaN (unwritten shared memory) or a partial sum


def test_stream_event_ordering(selftest):
    r = run(selftest, "streams")
    assert r.returncode == 0 and r.stdout.strip() == "wrong 0 of 4096", r.stdout + r.stderr


def test_missing_event_wait_is_exposed(selftest):
    # Without cudaStreamWaitEvent the compute stream reads the buffer before the copy stream filled it.
    r = run(selftest, "streams_missing_wait")
    assert r.returncode == 0 and r.stdout.strip() == "wrong 4096 of 4096", r.stdout + r.stderr


def test_wmma_product_and_alignment_rule(selftest):
    r = run(selftest, "wmma")
    assert r.returncode == 0 and r.stdout.strip() == "wrong 0", r.stdout + r.stderr
    # A tile pointer off the 256-bit alignment WMMA requires is a launch failure, as it faults on a GPU.
    r = run(selftest, "wmma_misaligned")
    assert r.returncode == 0 and r.stdout.strip() == "sync cudaErrorLaunchFailure" and "256-bit" in r.stderr, r.stdout + r.stderr


def test_graph_replays_read_their_inputs_then(selftest):
    r = run(selftest, "graph")
    out = r.stdout.split("\n")
    assert r.returncode == 0 and out[:4] == ["copy cudaSuccess", "end cudaSuccess graph 1", "replay 1 wrong 0",
                                              "replay 2 wrong 0"], r.stdout + r.stderr


@pytest.mark.parametrize("case,first", [("graph_pageable", "copy cudaErrorStreamCaptureUnsupported"),
                                        ("graph_malloc", "malloc cudaErrorStreamCaptureUnsupported")])
def test_capture_refuses_what_a_gpu_refuses(selftest, case, first):
    # A copy from pageable memory or an allocation fails, and so does the whole capture (no graph).
    r = run(selftest, case)
    assert r.returncode == 0 and first in r.stdout, r.stdout + r.stderr
    assert "end cudaErrorStreamCaptureInvalidated graph 0" in r.stdout, r.stdout


def test_async_copy_lands_at_synchronization(selftest):
    r = run(selftest, "pinned_read")
    assert r.returncode == 0 and r.stdout.strip() == "before 0 after 1", r.stdout + r.stderr


def test_pageable_async_download_lands_at_synchronization(selftest):
    # A cudaMemcpyAsync into pageable memory read before a sync: stale here, so the bug is caught.
    r = run(selftest, "pageable_read")
    assert r.returncode == 0 and r.stdout.strip() == "before 0 after 1", r.stdout + r.stderr


def test_host_dereference_of_device_memory_stops_the_process(selftest):
    r = run(selftest, "host_deref")
    assert r.returncode == -signal.SIGSEGV and "survived" not in r.stdout
    assert "host code touched device memory" in r.stderr


def test_out_of_bounds_kernel_read_stops_the_process(selftest):
    r = run(selftest, "out_of_bounds")
    assert r.returncode == -signal.SIGSEGV and "survived" not in r.stdout
    assert "kernel read_at_kernel" in r.stderr and "past the end of a 4096-byte cudaMalloc" in r.stderr


def test_shuffle_after_exit_is_a_sticky_launch_failure(selftest):
    r = run(selftest, "shfl_after_exit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sync cudaErrorLaunchFailure" in r.stdout and "had exited" in r.stdout
    assert "later cudaErrorLaunchFailure" in r.stdout


def test_dynamic_shared_memory_limit(selftest):
    r = run(selftest, "smem_limit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split("\n")[:3] == ["without attribute cudaErrorInvalidValue", "with attribute cudaSuccess", "reversed 1"]


def test_half_conversion_matches_numpy(selftest):
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 2000),
        np.float32([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-9]),
    ]).astype(np.float32)
    r = run(selftest, "half_bits", stdin="\n".join(f"{v:.9g}" for v in x))
    assert r.returncode == 0, r.stderr
    got = np.array([int(line.split()[0]) for line in r.stdout.split("\n") if line], np.uint16)
    back = np.array([float(line.split()[1]) for line in r.stdout.split("\n") if line], np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal(got, want.view(np.uint16))
    np.testing.assert_array_equal(back, want.astype(np.float32))
