#!/usr/bin/env python3
"""Prompt processing and generation speed: x2l-edge vs llama.cpp (llama-cpp-python), same GGUF,
same thread count, interleaved in one run. Writes JSON to bench/results/.

    python bench/bench_llm.py                 # SmolLM2-135M Q4_1 (shipped) and a Q8_0 re-encoding
    python bench/bench_llm.py --threads 2 --pp 512 --tg 128 --reps 3

Method: pp = one eval of an n-token prompt into an empty context (best of reps);
tg = n single-token evals after a short prompt, greedy, tokens/s over the loop (best of reps).
Both runtimes are driven the same way from Python, one call per token, so per-call overhead
is included on both sides.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import cpu_name, greedy_decode_rate, prompt_ids, write_json  # noqa: E402
CACHE = os.path.join(ROOT, "bench", ".cache")


def bench_x2l(path, threads, pp_ids, tg_n, reps):
    import x2l_edge

    s = x2l_edge.Session(path, n_threads=threads, n_ctx=len(pp_ids) + tg_n + 64, n_batch=512)
    core = s._s
    core.eval(pp_ids[:8])  # warm-up: page in the weights
    core.truncate(0)
    pp, tg = [], []
    for _ in range(reps):
        core.truncate(0)
        t0 = time.perf_counter()
        core.eval(pp_ids)
        pp.append(len(pp_ids) / (time.perf_counter() - t0))
        core.truncate(0)
        core.eval(pp_ids[:16])
        tg.append(greedy_decode_rate(core, tg_n))
    return {"pp_tok_s": max(pp), "tg_tok_s": max(tg), "pp_all": pp, "tg_all": tg}


def bench_llamacpp(path, threads, pp_ids, tg_n, reps):
    import numpy as np
    import llama_cpp

    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=len(pp_ids) + tg_n + 64,
                          n_batch=512, n_ubatch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():
        # llama-cpp-python only fills llm.scores with logits_all=True; read the context's logits.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    llm.eval(pp_ids[:8])
    llm.reset()
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(pp_ids)
        pp.append(len(pp_ids) / (time.perf_counter() - t0))
        llm.reset()
        llm.eval(pp_ids[:16])
        tok = int(np.argmax(last_logits()))
        t0 = time.perf_counter()
        for _ in range(tg_n):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        tg.append(tg_n / (time.perf_counter() - t0))
    return {"pp_tok_s": max(pp), "tg_tok_s": max(tg), "pp_all": pp, "tg_all": tg,
            "version": llama_cpp.__version__}


def ensure_q8_0(src: str) -> str:
    os.makedirs(CACHE, exist_ok=True)
    dst = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q8_0.gguf")
    if not os.path.exists(dst):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "requantize.py"), src, dst,
                        "--outtype", "q8_0", "--quiet"], check=True)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512, help="prompt tokens")
    ap.add_argument("--tg", type=int, default=128, help="generated tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="*", help="GGUF paths (default: SmolLM2 Q4_1 and Q8_0)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "llm_cpu.json"))
    a = ap.parse_args(argv)

    from x2l_edge import _core, models

    paths = a.models or [models.smollm2_path()]
    if not a.models:
        paths.append(ensure_q8_0(paths[0]))
    results = []
    for path in paths:
        import x2l_edge

        vocab = x2l_edge.Session(path, n_threads=1, n_ctx=16).info["n_vocab"]
        ids = prompt_ids(a.pp, vocab)
        row = {"model": os.path.basename(path)}
        # Interleave the two runtimes so drifting machine load hits both alike.
        x = bench_x2l(path, a.threads, ids, a.tg, a.reps)
        l = bench_llamacpp(path, a.threads, ids, a.tg, a.reps)
        x2 = bench_x2l(path, a.threads, ids, a.tg, a.reps)
        for k in ("pp_tok_s", "tg_tok_s"):
            x[k] = max(x[k], x2[k])
        row["x2l_edge"], row["llama_cpp"] = x, l
        row["ratio_pp"] = x["pp_tok_s"] / l["pp_tok_s"]
        row["ratio_tg"] = x["tg_tok_s"] / l["tg_tok_s"]
        results.append(row)
        print(f"{row['model']:40s} pp{a.pp}: x2l {x['pp_tok_s']:8.1f} tok/s  llama.cpp {l['pp_tok_s']:8.1f}  "
              f"ratio {row['ratio_pp']:.2f} | tg{a.tg}: x2l {x['tg_tok_s']:7.1f}  llama.cpp {l['tg_tok_s']:7.1f}  "
              f"ratio {row['ratio_tg']:.2f}", flush=True)
    out = {
        "bench": "llm_cpu", "command": "python bench/bench_llm.py " + " ".join(argv or sys.argv[1:]),
        "threads": a.threads, "pp_tokens": a.pp, "tg_tokens": a.tg, "reps": a.reps,
        "cpu": cpu_name(), "cpu_features": _core.cpu_features(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
