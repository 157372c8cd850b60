"""Single-thread vec_dot throughput of cpp/cpu/quant.cpp (GB/s of weight bytes), optionally next to
llama.cpp's own kernels (libggml-cpu, e.g. from the llama-cpp-python wheel) on the same bytes.

Calling _testing.vec_dot from Python costs far more than the kernel, so this compiles a small C++
harness against cpp/cpu/quant.cpp (-O3 -march=native, like the CMake build) and runs it.

    python bench/bench_quant.py                 # x2l kernels, SIMD and forced-scalar
    python bench/bench_quant.py --ggml          # + libggml-cpu found in the llama_cpp package
    python bench/bench_quant.py --ggml-lib DIR --ggml-include DIR

The weight matrix is 256 rows (90-420 KB, cache resident): this measures the kernels, not DRAM.
Columns are GB/s of weight bytes, single thread: vec_dot row by row, vec_dot_rows (4-row
kernels where available), the forced scalar fallback, and ggml's vec_dot.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HARNESS = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/quant.h"
#ifdef WITH_GGML
#include "ggml-cpu.h"
#endif
using namespace x2l;

struct Case { DType t; int ggml_id; };

int main() {
#ifdef WITH_GGML
    ggml_cpu_init();
#endif
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    const Case cases[] = {{DType::Q4_1, 3}, {DType::Q8_0, 8}, {DType::Q4_0, 2}, {DType::Q5_0, 6},
                          {DType::Q5_1, 7}, {DType::Q4_K, 12}, {DType::Q6_K, 14}, {DType::F16, 1}};
    std::printf("%-5s %6s %10s %10s %10s %10s %9s %9s\n", "type", "n", "x2l", "x2l rows4", "scalar", "ggml",
                "x2l/ggml", "rows4/ggml");
    for (const Case& c : cases) {
        for (int64_t n : {576, 1536}) {
            if (n % type_info(c.t).block_size) continue;
            const int64_t rows = 256;
            const size_t rb = row_bytes(c.t, n);
            std::vector<uint8_t> W(rb * rows);
            for (auto& b : W) b = rng() & 0xff;
            // valid scales: small finite halves in every fp16 field position used by the type
            const size_t bb = type_info(c.t).block_bytes;
            for (size_t off = 0; off < W.size(); off += bb) {
                uint16_t d = fp32_to_fp16(0.01f * nd(rng)), m = fp32_to_fp16(0.01f * nd(rng));
                if (c.t == DType::Q6_K) std::memcpy(&W[off + 208], &d, 2);
                else if (c.t == DType::F16) std::memcpy(&W[off], &d, 2);
                else { std::memcpy(&W[off], &d, 2); if (c.t == DType::Q4_1 || c.t == DType::Q5_1 || c.t == DType::Q4_K) std::memcpy(&W[off + 2], &m, 2); }
            }
            std::vector<float> x(n);
            for (auto& v : x) v = nd(rng);
            const DType at = dot_type(c.t);
            std::vector<uint8_t> A(at == DType::F32 ? n * 4 : row_bytes(at, n));
            quantize_row(at, x.data(), A.data(), n);
            // best of 9 repetitions: the machine may be shared
            auto time_all = [&](auto&& all_rows) {
                double best = 1e9;
                for (int rep = 0; rep < 9; ++rep) {
                    const int iters = 40;
                    auto t0 = std::chrono::steady_clock::now();
                    for (int it = 0; it < iters; ++it) all_rows();
                    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                    best = std::min(best, s / (iters * rows));
                }
                return rb / best / 1e9;
            };
            auto time_it = [&](auto&& fn) {
                return time_all([&] {
                    volatile float sink = 0;
                    for (int64_t r = 0; r < rows; ++r) sink = sink + fn(W.data() + r * rb);
                });
            };
            std::vector<float> out(rows);
            double simd = time_it([&](const uint8_t* w) { return vec_dot(c.t, n, w, A.data()); });
            double rows4 = time_all([&] { vec_dot_rows(c.t, n, W.data(), rb, rows, A.data(), out.data()); });
            set_force_scalar(true);
            double scal = time_it([&](const uint8_t* w) { return vec_dot(c.t, n, w, A.data()); });
            set_force_scalar(false);
            double gg = 0;
#ifdef WITH_GGML
            if (c.t != DType::F16) {  // ggml's F16 dot takes fp16 activations: not comparable
                const auto* tr = ggml_get_type_traits_cpu(static_cast<ggml_type>(c.ggml_id));
                gg = time_it([&](const uint8_t* w) { float s; tr->vec_dot((int)n, &s, 0, w, 0, A.data(), 0, 1); return s; });
            }
#endif
            if (gg > 0)
                std::printf("%-5s %6ld %10.2f %10.2f %10.2f %10.2f %9.2f %9.2f\n", type_info(c.t).name, (long)n, simd,
                            rows4, scal, gg, simd / gg, rows4 / gg);
            else
                std::printf("%-5s %6ld %10.2f %10.2f %10.2f %10s %9s %9s\n", type_info(c.t).name, (long)n, simd, rows4,
                            scal, "-", "-", "-");
        }
    }
    return 0;
}
"""


def find_ggml():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, None
    pkg = Path(sys.modules["llama_cpp"].__file__).parent
    lib = pkg / "lib"
    inc = pkg.parent / "include"
    if (lib / "libggml-cpu.so").exists() and (inc / "ggml-cpu.h").exists():
        return lib, inc
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ggml", action="store_true", help="compare with libggml-cpu from the llama_cpp package")
    ap.add_argument("--ggml-lib", help="folder with libggml-cpu.so / libggml-base.so")
    ap.add_argument("--ggml-include", help="folder with ggml-cpu.h")
    ap.add_argument("--cxx", default=os.environ.get("CXX") or shutil.which("g++") or "c++")
    args = ap.parse_args()

    lib, inc = (Path(args.ggml_lib), Path(args.ggml_include)) if args.ggml_lib else (None, None)
    if args.ggml and lib is None:
        lib, inc = find_ggml()
        if lib is None:
            sys.exit("--ggml: llama_cpp with lib/libggml-cpu.so and include/ggml-cpu.h not found")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench.cpp"
        src.write_text(HARNESS)
        exe = Path(tmp) / "bench"
        march = "-mcpu=native" if os.uname().machine in ("aarch64", "arm64") else "-march=native"
        cmd = [args.cxx, "-std=c++17", "-O3", march, "-fno-math-errno", f"-I{ROOT / 'cpp'}", str(src),
               str(ROOT / "cpp" / "cpu" / "quant.cpp"), str(ROOT / "cpp" / "core" / "formats.cpp"), "-o", str(exe)]
        if lib is not None:
            cmd += ["-DWITH_GGML", f"-I{inc}", f"-L{lib}", "-lggml-cpu", "-lggml-base", f"-Wl,-rpath,{lib}"]
        subprocess.run(cmd, check=True)
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_common import cpu_name, machine_isa

        print(f"{cpu_name()}: machine ISA {machine_isa()}, harness built {march} (single thread)", flush=True)
        subprocess.run([str(exe)], check=True)


if __name__ == "__main__":
    main()
