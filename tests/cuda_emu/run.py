"""Builds the CUDA backend against the CPU emulator and runs tests/test_cuda.py and tests/test_cuda_vlm.py with it.

    python tests/cuda_emu/run.py [--build-dir build-emu] [pytest args...]

The module is built with X2L_CUDA=EMU (CMakeLists.txt): cpp/cuda/*.cu are rewritten by cu2cpp.py and
compiled as C++ against tests/cuda_emu/include, so every kernel, launch wrapper, stream, event and the
layer-pipelined reload run here, on a machine without a GPU, against the CPU backend. Four passes: a
discrete GPU (copies through the pipeline), an integrated one (X2L_EMU_INTEGRATED=1: Jetson's
zero-copy path), the copy-ordering tests again with copies run early (X2L_EMU_EARLY_COPIES=1), and
a 1 MiB device for the out-of-memory paths (X2L_EMU_MEM_MB=1), a 2 MiB one where the prefill's L cache
must give way, a driver that refuses stream capture (X2L_EMU_REFUSE_CAPTURE=1: decode without graphs), and a device
with 48 KB of shared memory per block (X2L_EMU_SMEM_OPTIN_KB=48: smaller attention tiles);
then bench/gpu/bench_cuda.py --smoke, so the GPU benchmark script has run before a GPU is lent. This says nothing about speed, and it is not a GPU: see include/cuda_runtime.h for
what the emulator models. Needs cmake, ninja and nanobind (the `test` extra installs them).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build-emu"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k attention)")
    args = ap.parse_args()

    t0 = time.time()
    configure = ["cmake", "-S", ROOT, "-B", args.build_dir, "-DX2L_CUDA=EMU", "-DX2L_TESTING=ON",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"]
    try:
        import ninja  # noqa: F401  (the pip package puts ninja on PATH)
        configure += ["-G", "Ninja"]
    except ImportError:
        pass
    cache = os.path.join(args.build_dir, "CMakeCache.txt")
    if not os.path.exists(cache) or "X2L_TESTING:BOOL=ON" not in open(cache).read():
        subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    # _core and the test module _testing (the kernel probes); x2l_edge loads both from this folder.
    subprocess.run(["cmake", "--build", args.build_dir, "--target", "_core", "_testing", "-j", str(args.jobs)],
                   check=True, stdout=subprocess.DEVNULL)
    core = glob.glob(os.path.join(args.build_dir, "_core*.so"))
    if not core:
        print("cuda_emu: the build made no _core module", file=sys.stderr)
        return 1
    print(f"cuda_emu: built {os.path.basename(core[0])} in {time.time() - t0:.0f} s", flush=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("X2L_EMU_")}
    env["X2L_CORE_PATH"] = core[0]
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # test_cuda_vlm.py: issue 20's kernels and families (M-RoPE LLM, SmolVLM2 / Qwen towers) against the CPU.
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_cuda.py"),
            os.path.join(ROOT, "tests", "test_cuda_vlm.py")]
    passes = [
        ("discrete GPU", {}, []),
        ("integrated GPU (zero-copy L tier)", {"X2L_EMU_INTEGRATED": "1"},
         ["-k", "pipeline or x2l or prefill or session or device or bandwidth or vision or beacon or videoxl or graph"]),
        # Copies as early as their stream allows: a copy that overwrites a slot a queued kernel still
        # reads (a missing release wait) corrupts it. The passes above run copies as late as possible,
        # which exposes the opposite, a kernel that does not wait for its copy.
        ("discrete GPU, early copies", {"X2L_EMU_EARLY_COPIES": "1"}, ["-k", "pipeline or x2l or prefill or bandwidth or beacon or videoxl or graph"]),
        ("1 MiB GPU (out of device memory)", {"X2L_EMU_MEM_MB": "1"}, ["-k", "small_device"]),
        ("2 MiB GPU (the prefill drops its L cache)", {"X2L_EMU_MEM_MB": "2"}, ["-k", "drops_its_low_cache"]),
        ("driver that refuses stream capture", {"X2L_EMU_REFUSE_CAPTURE": "1"}, ["-k", "capture_is_refused"]),
        # Host-to-device copies from pageable memory on a stream fail: the LLM, X²L and vision forwards
        # must stage their per-call inputs through pinned memory (a pageable copy synchronizes the stream).
        ("pageable copies on streams refused", {"X2L_EMU_STRICT_PAGEABLE": "1"},
         ["-k", "cuda_llm_matches or decode_graph or x2l_decoder or vision_matches or prefill_matches"]),
        # No opt-in shared memory above the default 48 KB (an sm_75 has 64): the tensor-core attention and
        # the f32 kernel's 4-rows-per-warp tiles at head_dim 256 do not fit and must give way, not fail.
        ("48 KB of shared memory per block", {"X2L_EMU_SMEM_OPTIN_KB": "48"},
         ["-k", "attention or prefill_matches or vision_matches"]),
    ]
    rc = 0
    for name, extra_env, extra_args in passes:
        print(f"cuda_emu: tests/test_cuda.py + test_cuda_vlm.py, emulated {name}", flush=True)
        r = subprocess.run(base + extra_args + args.pytest_args, env={**env, **extra_env}, cwd=ROOT)
        rc = rc or r.returncode
    # The GPU benchmark script, every step on a tiny model, so that a lent GPU's minutes are not spent
    # on a bug in the script (timings from the emulator mean nothing and are not kept).
    print("cuda_emu: bench/gpu/bench_cuda.py --smoke", flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        scratch = os.path.join(tmp, "tmpdir")  # its TMPDIR: whatever the script leaves there is a leak
        os.mkdir(scratch)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu", "bench_cuda.py"), "--smoke", "--cpu-threads", "2",
                            "--out", os.path.join(tmp, "smoke.json")], env={**env, "TMPDIR": scratch}, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        # torch's own compile cache (torchinductor_<user>) is torch's, not a leak of the script's
        left = [n for n in os.listdir(scratch) if not n.startswith("torchinductor_")]
        ok = r.returncode == 0 and not left
        print(f"cuda_emu: bench smoke {'ok' if ok else 'FAILED'}" + (f" (left behind in TMPDIR: {left})" if left else ""),
              flush=True)
        rc = rc or r.returncode or int(bool(left))
    return rc


if __name__ == "__main__":
    sys.exit(main())
