#!/usr/bin/env python3
"""Accuracy of the shipped tiny video-language model (x2l_edge/tiny_vlm.py) on held-out generated videos.

Two kinds of items, every one asked in three modes through the runtime (C++ vision + LLM):
  single frame   one generated frame as a one-frame video; questions "What colour is it?" / "What is the
                 shape?" (shape frames), "What number is it?" (digit cards), "What is the secret word?"
                 (word cards). Also reported: how many of the frame's 9 visual tokens are nearest (L2) to
                 the right caption token's input embedding ("reading" accuracy of the vision side alone).
  needle         a video of shape frames (1 fps) with one "secret word" card at a random second, at several
                 lengths; "What is the secret word?"
Modes: full (every visual token in the KV cache), h_only (bi-level index, no reload: top_k=0), x2l (the
model's default scorer and top_k: score chunks, reload their L-KVs, answer). An answer is correct if it
contains the expected word and no other answer of the same kind (tiny_vlm.answer_ok). Frames come from
seeds that training never used (tools/train_tiny_vlm.py draws its frames from other seed streams).

    python bench/eval_tiny_vlm.py --n 20 --lengths 30 60 120 240 --threads 2
writes bench/results/tiny_vlm.json and bench/results/tiny_vlm.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import x2l_edge  # noqa: E402
from x2l_edge import tiny_vlm as T  # noqa: E402
from bench_common import cpu_name, isa_info  # noqa: E402

MODES = ("full", "x2l", "h_only")
SINGLE = (("colour", "shape"), ("shape", "shape"), ("digit", "digit"), ("word", "word"))  # (question, frame)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


class Reader:
    """Nearest caption-vocabulary token of each visual token (vision side alone)."""

    def __init__(self, session):
        from x2l_edge import _core

        tok = lambda t: session.tokenize(t, special=False)  # noqa: E731
        self.pad = tok(T.PAD_TEXT)[0]
        self.ids = {c: T.caption_ids(tok, c, self.pad) for c in T.all_captions()}
        vocab = sorted({i for v in self.ids.values() for i in v})
        f = _core.GGUFFile.open(session.path)
        name, ne, ttype, _, nbytes = next(t for t in f.tensors() if t[0] == "token_embd.weight")
        raw = f.tensor_bytes(name)
        row = nbytes // ne[1]
        self.vocab = np.asarray(vocab)
        self.table = np.stack([np.asarray(_core.dequantize(ttype, raw[i * row:(i + 1) * row], ne[0])) for i in vocab])

    def tokens_right(self, embd: np.ndarray, caption: str) -> int:
        d = ((embd[:, None, :] - self.table[None]) ** 2).sum(-1)
        pred = self.vocab[d.argmin(1)]
        return int((pred == np.asarray(self.ids[caption])).sum())


def ask_all(session, full_session, frames, question, *, top_k=None, ratio_low=None, ratio_high=None,
            max_tokens=24, compressor=None, merge=None, pool_scope=None, options=None):
    """{mode: (answer, chunks, seconds)} for one video (uint8 array [T, H, W, 3]). options: more X2LOptions
    fields for the prefill."""
    n = len(frames)
    out = {}
    kw = {k: v for k, v in (("ratio_low", ratio_low), ("ratio_high", ratio_high), ("compressor", compressor),
                            ("merge", merge), ("pool_scope", pool_scope)) if v is not None}
    kw.update(options or {})
    t0 = time.perf_counter()
    ctx = session.prefill(frames, system=T.SYSTEM, max_frames=n, **kw)
    t_pre = time.perf_counter() - t0
    for mode in ("h_only", "x2l"):
        t0 = time.perf_counter()
        chunks = [] if mode == "h_only" else ctx.select(question=question, top_k=top_k)
        ans = ctx.ask(question, chunks=chunks, max_tokens=max_tokens).strip()
        out[mode] = {"answer": ans, "chunks": [int(c) for c in chunks], "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    ans = full_session.ask(frames, question, mode="full", system=T.SYSTEM, max_frames=n, max_tokens=max_tokens).strip()
    out["full"] = {"answer": ans, "chunks": None, "seconds": time.perf_counter() - t0}
    return out, t_pre, ctx


def parse_options(pairs: list[str]) -> dict:
    """--option NAME=VALUE pairs as X2LOptions fields (ValueError naming a bad one)."""
    import ast
    import dataclasses

    known = {f.name for f in dataclasses.fields(x2l_edge.X2LOptions)}
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--option {p!r}: want NAME=VALUE with NAME an X2LOptions field")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value  # a bare string, e.g. pool_scope=layers
    x2l_edge.X2LOptions(**out)  # type and range checks
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="items per cell")
    ap.add_argument("--lengths", type=int, nargs="+", default=[30, 60, 120, 240], help="needle video lengths (s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=None, help="X²L chunks reloaded (default: the model's)")
    ap.add_argument("--ratio-low", type=int, default=None, help="override the model's L-KV ratio")
    ap.add_argument("--ratio-high", type=int, default=None, help="override the model's H-KV ratio")
    ap.add_argument("--compressor", default=None, help="X²L compressor (default: the model's)")
    ap.add_argument("--merge", action="store_true", default=None, help="merge dropped values (X2LOptions.merge)")
    ap.add_argument("--pool-scope", default=None, choices=("head", "layers", "all"))
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="any other X2LOptions field for the prefill (a Python literal), e.g. merge_min_similarity=0.9")
    ap.add_argument("--seed", type=int, default=777, help="base seed of the held-out items")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-needle", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiny_vlm"))
    ap.add_argument("--rescore", action="store_true", help="only re-score OUT.json's answers and rewrite the report")
    a = ap.parse_args(argv)
    if a.rescore:
        data = json.loads(Path(a.out + ".json").read_text())
        write_report(data["config"], data["items"], data["seconds"], a.out)
        return 0

    options = parse_options(a.option)
    t_all = time.perf_counter()
    path = T.build_gguf(log=print)
    n_max = max(a.lengths) * T.TOKENS_PER_FRAME + 512
    session = x2l_edge.Session(path, n_threads=a.threads)
    full_session = x2l_edge.Session(path, n_threads=a.threads, n_ctx=max(4096, n_max))
    reader = Reader(session)
    isa = isa_info()
    cfg = {"model": str(path), "n": a.n, "lengths": a.lengths, "threads": a.threads, "seed": a.seed,
           "top_k": a.top_k if a.top_k is not None else session._meta("x2l.top_k"),
           "ratio_low": a.ratio_low if a.ratio_low is not None else session._meta("x2l.ratio_low"),
           "ratio_high": a.ratio_high if a.ratio_high is not None else session._meta("x2l.ratio_high"),
           "chunk_frames": session._meta("x2l.chunk_frames"),
           "compressor": a.compressor or x2l_edge.X2LOptions.for_model(session, video=True).compressor,
           "merge": bool(a.merge), "pool_scope": a.pool_scope or "head", "options": options,
           "tokens_per_frame": T.TOKENS_PER_FRAME,
           "kv_bytes_per_token": 2 * 2 * session.info["n_layer"] * session.info["n_head_kv"] * session.info["head_dim"],
           "machine": f"{cpu_name()}, ISA {isa['build']}", "isa": isa,
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    items = []
    comp_kw = dict(compressor=a.compressor, merge=a.merge, pool_scope=a.pool_scope, options=options)

    if not a.skip_single:
        for qi, (qk, fk) in enumerate(SINGLE):
            for i in range(a.n):
                rng = np.random.default_rng([a.seed, 11, qi, i])
                spec = T.random_spec(rng, fk)
                frame = T.draw(spec, np.random.default_rng([a.seed, 12, qi, i]))[None]
                embd = session.encode_frames(session.preprocessor.batch(frame))
                right = reader.tokens_right(embd, spec.caption)
                res, t_pre, ctx = ask_all(session, full_session, frame, T.QUESTIONS[qk], top_k=a.top_k,
                                        ratio_low=a.ratio_low, ratio_high=a.ratio_high, **comp_kw)
                cfg["scorer"] = ctx.default_scorer
                expected = spec.answer(qk)
                for m in MODES:
                    res[m]["correct"] = T.answer_ok(res[m]["answer"], expected, qk)
                items.append({"task": "single", "question": qk, "i": i, "caption": spec.caption, "expected": expected,
                              "tokens_read": right, "prefill_seconds": t_pre, "results": res})
                print(f"single {qk:6s} {i:3d} {spec.caption!r:34s} read {right}/9  " +
                      "  ".join(f"{m}:{'+' if res[m]['correct'] else '-'}{res[m]['answer'][:28]!r}" for m in MODES),
                      flush=True)

    if not a.skip_needle:
        for L in a.lengths:
            for i in range(a.n):
                vid = T.needle_video(a.seed * 100003 + L * 1009 + i, L)
                res, t_pre, ctx = ask_all(session, full_session, vid.frames, T.QUESTIONS["word"], top_k=a.top_k,
                                          ratio_low=a.ratio_low, ratio_high=a.ratio_high, **comp_kw)
                cfg["scorer"] = ctx.default_scorer
                for m in MODES:
                    res[m]["correct"] = T.answer_ok(res[m]["answer"], vid.word, "word")
                mem = ctx.memory()
                items.append({"task": "needle", "length": L, "i": i, "expected": vid.word,
                              "needle_frame": vid.needle_frame, "needle_chunk": vid.needle_chunk,
                              "n_chunks": ctx.n_chunks, "selected_needle": vid.needle_chunk in res["x2l"]["chunks"],
                              "prefill_seconds": t_pre,
                              "kv": {"high": mem["high_bytes"], "low": mem["low_bytes"], "sink": mem["sink_bytes"]},
                              "results": res})
                print(f"needle {L:4d}s {i:3d} {vid.word:8s} chunk {vid.needle_chunk:2d} sel {res['x2l']['chunks']}  " +
                      "  ".join(f"{m}:{'+' if res[m]['correct'] else '-'}{res[m]['answer'][:28]!r}" for m in MODES),
                      flush=True)

    write_report(cfg, items, time.perf_counter() - t_all, a.out)
    return 0


def write_report(cfg: dict, items: list, seconds: float, out_prefix: str) -> None:
    """Score every answer (tiny_vlm.answer_ok) and write OUT.json and OUT.md."""
    qkind = {"needle": "word"}
    for it in items:
        kind = it["question"] if it["task"] == "single" else qkind[it["task"]]
        for m in MODES:
            it["results"][m]["correct"] = T.answer_ok(it["results"][m]["answer"], it["expected"], kind)
    rows = []
    for qk, _ in SINGLE:
        its = [it for it in items if it["task"] == "single" and it["question"] == qk]
        if its:
            rows.append({"cell": f"single frame: {qk}", "n": len(its),
                         "read": sum(it["tokens_read"] == 9 for it in its),
                         **{m: sum(it["results"][m]["correct"] for it in its) for m in MODES}})
    cost = []
    for L in cfg["lengths"]:
        its = [it for it in items if it["task"] == "needle" and it["length"] == L]
        if its:
            rows.append({"cell": f"needle, {L} s ({L} frames, {-(-L // T.CHUNK_FRAMES)} chunks)", "n": len(its),
                         "selected": sum(it["selected_needle"] for it in its),
                         **{m: sum(it["results"][m]["correct"] for it in its) for m in MODES}})
            mean = lambda f: float(np.mean([f(it) for it in its]))  # noqa: E731
            cost.append({"length": L, "tokens": L * T.TOKENS_PER_FRAME,
                         "high_kib": mean(lambda it: it["kv"]["high"]) / 1024,
                         "low_kib": mean(lambda it: it["kv"]["low"]) / 1024,
                         "full_kib": L * T.TOKENS_PER_FRAME * cfg.get("kv_bytes_per_token", 23040) / 1024,
                         "prefill_s": mean(lambda it: it["prefill_seconds"]),
                         **{f"{m}_s": mean(lambda it, m=m: it["results"][m]["seconds"]) for m in MODES}})
    out = {"config": cfg, "summary": rows, "cost": cost, "items": items, "seconds": seconds}
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(out_prefix + ".json").write_text(json.dumps(out, indent=1))

    def cell(k, n):
        lo, hi = wilson(k, n)
        return f"{k}/{n} ({100 * k / n:.0f} %, {100 * lo:.0f}–{100 * hi:.0f})"

    md = ["# Tiny VLM accuracy on held-out generated videos",
          "",
          f"`{cfg['command']}` ({seconds / 60:.0f} min, {cfg['threads']} threads, {cfg['machine']}, shared 2-core CPU)",
          "",
          f"Model: {Path(cfg['model']).name} — SmolLM2-135M-Instruct (frozen, Q4_1) + the shipped tiny SigLIP "
          f"({T.IMAGE_SIZE} px, patch {T.PATCH_SIZE}, width {T.WIDTH}, {T.N_LAYER} layers) + projector; "
          f"{T.TOKENS_PER_FRAME} tokens per frame, {cfg['chunk_frames']} frames per chunk, ratio_low "
          f"{cfg['ratio_low']}, ratio_high {cfg['ratio_high']}, X²L top_k {cfg['top_k']}, scorer "
          f"`{cfg.get('scorer', '?')}`, compressor `{cfg.get('compressor', 'snapkv')}`"
          f"{' with merge' if cfg.get('merge') else ''}{', pool_scope ' + cfg['pool_scope'] if cfg.get('pool_scope', 'head') != 'head' else ''}.",
          "Cells: correct/n (accuracy, 95 % Wilson interval); an answer is right when the first colour / shape / "
          "digit / word of the asked kind that it names is the expected one. `read`: frames whose 9 visual tokens "
          "are all nearest (L2) to the right caption token's embedding (vision side alone). `selected`: X²L "
          "selections that include the needle's chunk. H-only on a single frame keeps 1 of its 10 entries.",
          "",
          "| cell | full KV | X²L | H-only | read / selected |",
          "|---|---|---|---|---|"]
    for r in rows:
        extra = f"read {r['read']}/{r['n']}" if "read" in r else f"selected {r['selected']}/{r['n']}"
        md.append(f"| {r['cell']} | {cell(r['full'], r['n'])} | {cell(r['x2l'], r['n'])} | "
                  f"{cell(r['h_only'], r['n'])} | {extra} |")
    if cost:
        md += ["", "Needle videos, means per video: KV bytes per tier and seconds (bi-level prefill once; per "
               "answer: full KV re-encodes and prefills the whole video, X²L/H-only reuse the index).", "",
               "| length | visual tokens | H (device) KiB | L (host) KiB | full KV KiB | bi-level prefill s | "
               "full KV s | X²L s | H-only s |", "|---|---|---|---|---|---|---|---|---|"]
        for c in cost:
            md.append(f"| {c['length']} s | {c['tokens']} | {c['high_kib']:.0f} | {c['low_kib']:.0f} | "
                      f"{c['full_kib']:.0f} | {c['prefill_s']:.1f} | {c['full_s']:.1f} | {c['x2l_s']:.2f} | "
                      f"{c['h_only_s']:.2f} |")
    Path(out_prefix + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
