"""What every benchmark records beside its numbers: the CPU, the x2l-edge build, and the JSON file."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa_of(features: set) -> str:
    if {"avx512f", "AVX512F"} & features:
        return "AVX-512"
    if {"avx2", "AVX2"} & features:
        return "AVX2"
    if {"asimd", "NEON"} & features or platform.machine() in ("aarch64", "arm64"):
        return "NEON"
    return "portable"


def machine_isa() -> str:
    """The widest vector ISA this machine offers (from /proc/cpuinfo): AVX-512, AVX2, NEON or portable."""
    flags: set = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return _isa_of(flags)


def isa_info() -> dict:
    """Which instruction set the x2l-edge kernels were built for (cpu_features) and what the machine has:
    a build for x86-64-v3 measures the AVX2 kernels on an AVX-512 machine, and says so."""
    from x2l_edge import _core

    feats = _core.cpu_features()
    return {"build": _isa_of(set(feats.split())), "build_features": feats, "machine": machine_isa()}


def build_info() -> dict:
    """Which x2l-edge build ran: git HEAD (+ whether the C++ tree was dirty) and the extension module's path."""
    from x2l_edge import _core

    info = {"core": getattr(_core, "__file__", None)}
    try:
        info["git_head"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "cpp", "bindings"], capture_output=True,
                               text=True, timeout=10).stdout.split()
        info["cpp_dirty"] = bool(dirty)
        if info["core"]:
            info["core_mtime"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(info["core"])))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_json(path: str, obj, indent: int = 2) -> None:
    """Writes obj to path (creating its folder) and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
    print("wrote", path)


def prompt_ids(n: int, vocab: int) -> list[int]:
    """Deterministic pseudo-text token ids for speed runs (avoiding the special ids at the vocabulary's start)."""
    ids, x = [], 12345
    for _ in range(n):
        x = (x * 1103515245 + 12345) % (2**31)
        ids.append(200 + x % (vocab - 400))
    return ids


def greedy_decode_rate(core, n: int) -> float:
    """Tokens/s of n greedy single-token evals on a core session (_core.LlmSession), continuing from its
    last logits: one eval call per token, so per-call overhead counts as it would for a user."""
    import numpy as np

    tok = int(np.argmax(core.logits()))
    t0 = time.perf_counter()
    for _ in range(n):
        core.eval([tok])
        tok = int(np.argmax(core.logits()))
    return n / (time.perf_counter() - t0)
