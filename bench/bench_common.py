"""What every benchmark records beside its numbers (the CPU, the x2l-edge build, the JSON file), and the
pieces the tower-fps benchmarks share (llama.cpp's mtmd as the peer, interleaved timing rows)."""
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


def rel_rms(got, ref) -> float:
    """Relative RMS error of got against ref: sqrt(mean((got - ref)^2) / mean(ref^2))."""
    import numpy as np

    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


def timed(fn, reps: int) -> float:
    """Mean wall seconds of one fn() call over reps calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def speed_pair(ours: list[float], theirs: list[float]) -> dict:
    """The timing part of a tower-fps row from interleaved rounds of seconds per frame: best, median and
    rounds of each runtime, best frames/s, and x2l-edge's speed over the peer's (ratio of the medians)."""
    import statistics

    row = {"x2l_edge_s_per_frame": {"best": min(ours), "median": statistics.median(ours), "rounds": ours},
           "mtmd_s_per_frame": {"best": min(theirs), "median": statistics.median(theirs), "rounds": theirs}}
    row["x2l_edge_fps_best"] = 1.0 / min(ours)
    row["mtmd_fps_best"] = 1.0 / min(theirs)
    row["speed_ratio_x2l_over_mtmd_median"] = statistics.median(theirs) / statistics.median(ours)
    return row


class Mtmd:
    """llama.cpp's multimodal runtime (mtmd, via llama-cpp-python) on a model.gguf + mmproj.gguf pair, CPU only,
    holding the media chunks it makes of `images` (uint8 HxWx3, one marker each; `mergeable` lets a
    family that pairs video frames in time, Qwen2-VL / 2.5-VL, merge them into one chunk)."""

    def __init__(self, model_path, mmproj_path, images, n_threads: int, mergeable: bool = False):
        import ctypes

        import llama_cpp
        import numpy as np
        from llama_cpp import mtmd_cpp as M

        self.M, self.llama_cpp = M, llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                          llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        params = M.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = n_threads
        params.print_timings = False
        self.ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"mtmd could not load {mmproj_path}")
        self._bufs, self.bitmaps = [], []
        for img in images:
            data = np.ascontiguousarray(img, dtype=np.uint8)
            self._bufs.append((ctypes.c_uint8 * data.size).from_buffer_copy(data.tobytes()))
            self.bitmaps.append(M.mtmd_bitmap_init(data.shape[1], data.shape[0], self._bufs[-1]))
            if mergeable:
                M.mtmd_bitmap_set_mergeable(self.bitmaps[-1], True)
        text = M.mtmd_default_marker() * len(images)
        it = M.mtmd_input_text(text=text, text_len=len(text), add_special=False, parse_special=True)
        self.chunks = M.mtmd_input_chunks_init()
        arr = (M.mtmd_bitmap_p_ctypes * len(self.bitmaps))(*self.bitmaps)
        if M.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(it), arr, len(self.bitmaps)) != 0:
            self.close()
            raise RuntimeError("mtmd_tokenize failed")
        every = [M.mtmd_input_chunks_get(self.chunks, i) for i in range(M.mtmd_input_chunks_size(self.chunks))]
        self.media_chunks = [c for c in every if M.mtmd_input_chunk_get_type(c) != 0]  # 0: text

    def encode(self, i: int = 0):
        """Projector output [n_tokens, n_embd] (float32) of media chunk i."""
        import numpy as np

        chunk = self.media_chunks[i]
        if self.M.mtmd_encode_chunk(self.ctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        n = self.M.mtmd_input_chunk_get_n_tokens(chunk)
        emb = self.M.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(emb, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()

    def close(self):
        M = self.M
        M.mtmd_input_chunks_free(self.chunks)
        for bm in self.bitmaps:
            M.mtmd_bitmap_free(bm)
        M.mtmd_free(self.ctx)
        self.llama_cpp.llama_model_free(self.model)


class SharedPrefill:
    """Settings that differ only in question-time options (X2LOptions.QUESTION, e.g. question_gap) share
    one bi-level prefill: the first such setting's index is reused with the other's question defaults."""

    def __init__(self):
        self._ctx = {}

    def context(self, overrides: dict, prefill, options):
        """(context, base): overrides: the setting's X2LOptions fields; prefill(): its VideoContext, made
        when no earlier setting shares its prefill; options: the setting's resolved X2LOptions. base: the
        context whose prefill this one shares (itself for a new prefill)."""
        from x2l_edge.options import X2LOptions
        from x2l_edge.x2l import VideoContext

        key = tuple(sorted((k, repr(v)) for k, v in overrides.items() if k not in X2LOptions.QUESTION))
        base = self._ctx.get(key)
        if base is None:
            self._ctx[key] = base = prefill()
            return base, base
        return VideoContext(base.session, base.index, question_prefix=base.question_prefix,
                            question_suffix=base.question_suffix, answer_prefix=base.answer_prefix,
                            max_answer_tokens=base.max_answer_tokens, **options.question_kwargs()), base
