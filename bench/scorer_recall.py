#!/usr/bin/env python3
"""Chunk recall of the in-model scorers alone (no answer decoding): cheap, so it can look at needle samples
that the accuracy table (bench/eval_needles.py, idx 0..49) never uses.

    python bench/scorer_recall.py --first 50 --count 40      # idx 50..89 of single and multi-key
    python bench/scorer_recall.py --first 50 --count 40 --out bench/results/scorer_recall.json

Same samples and settings as eval_needles.py (~2k tokens, chunks of 256, ratio_low 1, ratio_high 32,
SmolLM2-135M-Instruct Q4_1): per task and scorer, how often the needle's chunk is ranked first, is in the
top 3, and how often chunk 0 is in the top 3.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import build_info, cpu_name, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=50)
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--tasks", nargs="+", default=["single", "multikey"])
    ap.add_argument("--scorers", nargs="+", default=["attention", "keys"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import eval_needles as en
    import x2l_edge

    s = x2l_edge.Session(x2l_edge.models.smollm2_path(), n_threads=a.threads, n_ctx=2048 + 512)
    tok = en.Tok(s)
    res = {"bench": "scorer_recall", "first": a.first, "count": a.count, "cpu": cpu_name(), "build": build_info(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tasks": {}, "samples": []}
    for task in a.tasks:
        cells = {sc: {"top1": 0, "top3": 0, "chunk0_in_top3": 0, "n": 0} for sc in a.scorers}
        for i in range(a.first, a.first + a.count):
            smp = en.make_sample(task, i, tok, n_tokens=2048, chunk_tokens=256)
            ctx = s.prefill_text(smp["context"], chunk_tokens=256, ratio_low=1, ratio_high=32)
            ctx.answer_prefix = smp["answer_prefix"]
            target = set(smp["needle_chunks"])
            row = {"task": task, "idx": i, "target": sorted(target)}
            for sc in a.scorers:
                r = np.asarray(ctx.scores(smp["question"], sc))
                order = [int(c) for c in np.argsort(-r, kind="stable")]
                c = cells[sc]
                c["top1"] += order[0] in target
                c["top3"] += bool(target & set(order[:3]))
                c["chunk0_in_top3"] += 0 in order[:3]
                c["n"] += 1
                row[sc] = [float(x) for x in r]
            res["samples"].append(row)
        res["tasks"][task] = cells
        for sc, c in cells.items():
            print(f"{task:9s} {sc:10s} top-1 {c['top1']}/{c['n']}  top-3 {c['top3']}/{c['n']}  "
                  f"chunk 0 in top-3 {c['chunk0_in_top3']}/{c['n']}", flush=True)
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
