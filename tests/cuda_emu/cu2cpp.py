"""Rewrites a .cu file into C++ for the CUDA emulator (tests/cuda_emu): the two CUDA constructs that
are syntax rather than library, kernel launches and `extern __shared__` arrays, become calls into the
emulator. Everything else compiles as is against tests/cuda_emu/include.

    kernel<T><<<grid, block, smem, stream>>>(a, b)  ->  ::x2l_emu::Launch(grid, block, smem, stream).run("kernel<T>", kernel<T>, a, b)
    extern __shared__ float smem[];                 ->  float* smem = static_cast<float*>(::x2l_emu::dynamic_smem());

Usage: python cu2cpp.py in.cu out.cpp
"""
import re
import sys

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>(\s*)\((\s*)(\)?)", re.S)
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def convert(src: str, path: str) -> str:
    def launch(m: re.Match) -> str:
        # Whitespace (newlines included) is kept so that #line keeps pointing at the .cu's lines.
        name, cfg, ws1, ws2, empty = m.groups()
        return f'::x2l_emu::Launch({cfg}){ws1}.run("{name}", {name}' + (ws2 + ")" if empty else ", " + ws2)

    out, n_launch = LAUNCH.subn(launch, src)
    out, n_shared = EXTERN_SHARED.subn(r"\1* \2 = static_cast<\1*>(::x2l_emu::dynamic_smem());", out)
    if "<<<" in out or "extern __shared__" in out:
        raise SystemExit(f"cu2cpp: {path}: a launch or shared declaration was not recognised")
    return f'#line 1 "{path}"\n' + out


if __name__ == "__main__":
    src_path, dst_path = sys.argv[1], sys.argv[2]
    with open(src_path, encoding="utf-8") as f:
        text = convert(f.read(), src_path)
    with open(dst_path, "w", encoding="utf-8") as f:
        f.write(text)
