"""What ptxas allots each CUDA kernel, per target architecture: registers, spills, stack, static shared memory.

No GPU needed: it compiles cpp/cuda/*.cu with the flags CMakeLists.txt uses (read from it) for each
architecture and reads `ptxas -v`. Spills and register counts bound occupancy on every GPU, Jetson Orin
(sm_87) included, so a change that makes a kernel spill shows up here before any GPU run.

    python bench/gpu/kernel_resources.py [--arch 86 87 89 90] [--out bench/results/kernel_resources.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cmake_cuda_flags() -> list[str]:
    """The options CMakeLists.txt gives nvcc for the x2l_cuda target (target_compile_options)."""
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    m = re.search(r"target_compile_options\(x2l_cuda PRIVATE \$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>\)", text)
    if not m:
        raise RuntimeError("CMakeLists.txt: no CUDA compile options for x2l_cuda")
    return m.group(1).split()


FLAGS = ["-std=c++17", *cmake_cuda_flags(), "-Xptxas", "-v", "-I", os.path.join(ROOT, "cpp")]

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc() -> str | None:
    for c in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc"):
        if c and os.path.exists(c):
            return c
    return None


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(pretty: str) -> str:
    """x2l::cudak::(anonymous namespace)::attn_kernel<4>(x2l::cudak::...) -> attn_kernel<4>"""
    head = re.sub(r"\(anonymous namespace\)::|\bx2l::cudak::|\bx2l::", "", pretty)
    head = head[5:] if head.startswith("void ") else head
    head = head.split("(")[0]
    return re.sub(r"Fmt<(\d+)>", lambda m: f"Fmt<{TYPE_NAMES.get(int(m.group(1)), m.group(1))}>", head).strip()


TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 12: "q4_k", 14: "q6_k", 30: "bf16"}


def parse(log: str) -> dict[str, dict]:
    """ptxas -v output of one compile -> {mangled entry: resources}."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = PROPS.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), smem_static=int(m.group(2) or 0))
            cur = None
    return out


def compile_one(nvcc: str, src: str, arch: str) -> tuple[str, str, dict]:
    r = subprocess.run([nvcc, *FLAGS, f"-arch=sm_{arch}", "-c", src, "-o", os.devnull], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src} for sm_{arch}:\n{r.stderr[-2000:]}")
    return src, arch, parse(r.stderr + r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80", "86", "87", "89", "90"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "kernel_resources.json"))
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    nvcc = find_nvcc()
    if not nvcc:
        print("kernel_resources: no nvcc on this machine", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    sources = sorted(glob.glob(os.path.join(ROOT, "cpp", "cuda", "*.cu")))
    results: dict[str, dict] = {arch: {} for arch in a.arch}
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        for src, arch, entries in pool.map(lambda t: compile_one(nvcc, *t), [(s, ar) for s in sources for ar in a.arch]):
            names = demangle(list(entries))
            for mangled, res in entries.items():
                results[arch][short_name(names[mangled])] = {**res, "file": os.path.relpath(src, ROOT)}
    spills = {arch: {k: v["spill_stores"] + v["spill_loads"] for k, v in ks.items()
                     if v.get("spill_stores", 0) + v.get("spill_loads", 0) > 0} for arch, ks in results.items()}
    doc = {"nvcc": version, "flags": cmake_cuda_flags(), "kernels": {arch: dict(sorted(ks.items())) for arch, ks in results.items()},
           "spilling": spills, "max_registers": {arch: max(v["registers"] for v in ks.values()) for arch, ks in results.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    for arch in a.arch:
        print(f"sm_{arch}: {len(results[arch])} kernels, max {doc['max_registers'][arch]} registers, "
              f"spilling: {spills[arch] or 'none'}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
