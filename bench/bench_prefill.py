#!/usr/bin/env python3
"""Cost of the bi-level prefill: two-pass (official semantics) vs single-pass, against one plain
(full-KV) pass over the same tokens, on the real SmolLM2 weights. Writes bench/results/prefill_cpu.json.

    python bench/bench_prefill.py --tokens 4096 --chunk 512 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import cpu_name, isa_info, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio-low", type=int, default=2)
    ap.add_argument("--ratio-high", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "prefill_cpu.json"))
    a = ap.parse_args(argv)

    import x2l_edge
    from x2l_edge.x2l import prefill_chunks, split_template

    s = x2l_edge.Session(x2l_edge.models.smollm2_path(), n_threads=a.threads, n_ctx=a.tokens + 256, n_batch=512)
    words = ("river stone light house garden window market winter music letter forest engine paper city "
             "morning bridge silver animal doctor island").split()
    text = " ".join(words[(i * 7 + i // 3) % len(words)] + ("." if i % 11 == 10 else "") for i in range(a.tokens))
    ids = s.tokenize(text, special=False)[: a.tokens]
    chunks = [ids[i:i + a.chunk] for i in range(0, len(ids), a.chunk)]
    prefix, _ = split_template(s, None)
    sink = s.tokenize(prefix)

    t0 = time.perf_counter()
    s.reset()
    s.eval(sink + ids)
    full_s = time.perf_counter() - t0
    rows = {"full_kv_one_pass": {"seconds": full_s, "forward_tokens": len(sink) + len(ids)}}
    for name, two in (("x2l_two_pass", True), ("x2l_single_pass", False)):
        t0 = time.perf_counter()
        index, st = prefill_chunks(s, chunks, sink_ids=sink, two_pass=two, ratio_low=a.ratio_low,
                                   ratio_high=a.ratio_high)
        rows[name] = {"seconds": time.perf_counter() - t0, "forward_tokens": st["forward_tokens"],
                      **{k: v for k, v in index.memory().items()}}
    one = rows["full_kv_one_pass"]["seconds"]
    for r in rows.values():
        r["cost_vs_one_pass"] = r["seconds"] / one
    out = {"bench": "prefill_cpu", "command": "python bench/bench_prefill.py " + " ".join(argv or sys.argv[1:]),
           "tokens": len(ids), "chunk": a.chunk, "threads": a.threads, "ratios": [a.ratio_low, a.ratio_high],
           "cpu": cpu_name(), "isa": isa_info(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}
    for k, r in rows.items():
        print(f"{k:18s} {r['seconds']:7.2f} s  forward tokens {r['forward_tokens']:6d}  x{r['cost_vs_one_pass']:.2f}")
    write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
