#!/usr/bin/env python3
"""Several X²L prefill settings side by side on the same tiny-VLM needle videos (x2l_edge/tiny_vlm.py).

For each video the full-KV answer is computed once and shared; each setting then runs its own bi-level
prefill and answers three ways: `x2l` (the model's default scorer and top_k), `oracle1` (only the card's
chunk reloaded) and `h_only` (no reload). It is the quick way to compare H-tier or L-tier rules on the
long videos where they differ; bench/eval_tiny_vlm.py gives the per-setting tables with confidence
intervals and costs.

Seeds: eval_tiny_vlm.py's held-out items use seed 777; tools/train_tiny_vlm.py draws its frames from the
streams 1000 + s, 2000 + s and 3000 + s. Exploration runs here used seeds 555 and 556, so that 777 and other
unused seeds stay unseen for the held-out check.

    python bench/tiny_vlm_sweep.py --seed 555 --n 20 --length 240 \
        --config kd_layers ratio_low=1 ratio_high=32 compressor=keydiff pool_scope=layers \
        --config kd_all ratio_low=1 ratio_high=32 compressor=keydiff pool_scope=all \
        --out bench/results/tiny_vlm_sweep_h32_555
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import x2l_edge  # noqa: E402
from x2l_edge import tiny_vlm as T  # noqa: E402
from bench_common import SharedPrefill, cpu_name, isa_info  # noqa: E402
from x2l_edge.options import X2LOptions  # noqa: E402
from eval_tiny_vlm import parse_options, wilson  # noqa: E402

MODES = ("x2l", "oracle1", "h_only")


def run(a, configs: dict) -> dict:
    path = T.build_gguf(log=lambda *_: None)
    s = x2l_edge.Session(path, n_threads=a.threads)
    full_session = x2l_edge.Session(path, n_threads=a.threads, n_ctx=max(4096, a.length * T.TOKENS_PER_FRAME + 512))
    q = T.QUESTIONS["word"]
    isa = isa_info()
    res = {"bench": "tiny_vlm_sweep", "seed": a.seed, "seed_note": a.seed_note, "length": a.length, "configs": configs,
           "threads": a.threads,
           "machine": f"{cpu_name()}, ISA {isa['build']}", "isa": isa, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_start": os.getloadavg()[0], "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "items": []}
    for i in range(a.n):
        vid = T.needle_video(a.seed * 100003 + a.length * 1009 + i, a.length)
        ans = full_session.ask(vid.frames, q, mode="full", system=T.SYSTEM, max_frames=len(vid.frames),
                               max_tokens=24).strip()
        item = {"i": i, "word": vid.word, "needle_chunk": vid.needle_chunk,
                "full": {"answer": ans, "correct": T.answer_ok(ans, vid.word, "word")}, "configs": {}}
        shared = SharedPrefill()  # settings that differ only at question time (question_gap...) share a prefill
        for name, kw in configs.items():
            ctx, _ = shared.context(kw, lambda: s.prefill(vid.frames, system=T.SYSTEM, max_frames=len(vid.frames),
                                                          progress=False, **kw),
                                    X2LOptions.for_model(s, video=True, **kw))
            chosen = [int(c) for c in ctx.select(question=q)]
            r = {"chunks": chosen, "selected": vid.needle_chunk in chosen}
            for mode, chunks in (("x2l", chosen), ("oracle1", [vid.needle_chunk]), ("h_only", [])):
                out = ctx.ask(q, chunks=chunks, max_tokens=24).strip()
                r[mode] = {"answer": out, "correct": T.answer_ok(out, vid.word, "word")}
            item["configs"][name] = r
            del ctx
        del shared
        res["items"].append(item)
        print(f"{i:3d} {vid.word:8s} chunk {vid.needle_chunk:2d} full {'+' if item['full']['correct'] else '-'}  " +
              "  ".join(f"{n}=" + "".join("+" if r[m]["correct"] else "-" for m in MODES)
                        for n, r in item["configs"].items()), flush=True)
        res["load_now"] = os.getloadavg()[0]
        write(res, a.out)
    return res


def summary(res: dict) -> dict:
    items = res["items"]
    return {"n": len(items), "full": sum(it["full"]["correct"] for it in items),
            "configs": {name: {**{m: sum(it["configs"][name][m]["correct"] for it in items) for m in MODES},
                               "selected": sum(it["configs"][name]["selected"] for it in items)}
                        for name in res["configs"]}}


def markdown(res: dict) -> str:
    sm = summary(res)
    n = sm["n"]

    def cell(k):
        lo, hi = wilson(k, n)
        return f"{k}/{n} ({100 * lo:.0f}–{100 * hi:.0f})"

    L = [f"# Tiny VLM: X²L settings side by side on {res['length']} s needle videos", "",
         f"`{res['command']}` — {res['machine']}, {res['threads']} thread(s), {res['time']}, load average "
         f"{res['load_start']:.1f} at the start, {res.get('load_now', res['load_start']):.1f} at the last write. "
         f"Seed {res['seed']}" + (f" ({res['seed_note']})" if res.get("seed_note") else "") + ".", "",
         *([res["note"], ""] if res.get("note") else []),
         "Cells: correct/n (95 % Wilson interval). full KV: the whole video in the cache (one answer per video, "
         "shared by every setting). x2l: the model's default scorer and top_k reload; oracle1: only the card's chunk "
         "reloaded; H-only: no reload. selected: videos whose x2l selection holds the card's chunk.", "",
         f"Full KV: {cell(sm['full'])}.", "",
         "| setting | options | x2l | oracle1 | H-only | selected |", "|---|---|---|---|---|---|"]
    for name, c in sm["configs"].items():
        opts = ", ".join(f"{k}={v}" for k, v in res["configs"][name].items())
        L.append(f"| {name} | {opts} | {cell(c['x2l'])} | {cell(c['oracle1'])} | {cell(c['h_only'])} | "
                 f"{c['selected']}/{n} |")
    return "\n".join(L) + "\n"


def write(res: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({**res, "summary": summary(res)}, indent=1))
    Path(out + ".md").write_text(markdown(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", action="append", required=True, metavar=("NAME", "OPTION=VALUE"),
                    help="a setting: its name, then X2LOptions fields as NAME=VALUE (repeat --config per setting)")
    ap.add_argument("--seed", type=int, default=555)
    ap.add_argument("--seed-note", default="", help="how the seed was used before (e.g. 'fresh: first use'), for the table")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--length", type=int, default=240, help="video seconds (1 fps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiny_vlm_sweep"))
    ap.add_argument("--report", action="store_true", help="only rewrite OUT.md from OUT.json")
    a = ap.parse_args(argv)
    if a.report:
        res = json.loads(Path(a.out + ".json").read_text())
        write(res, a.out)
        print(markdown(res))
        return 0
    configs = {}
    for name, *pairs in a.config:
        if name in configs:
            raise SystemExit(f"--config {name}: given twice")
        configs[name] = parse_options(pairs)
    print(markdown(run(a, configs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
