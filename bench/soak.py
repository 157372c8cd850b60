"""Soak test of one shared Session (issue 24): N threads mix generate (plain and streamed), chat, eval,
prefill_text + ask and questions on a shared VideoContext, while a canceller thread cancels at random
(Session.cancel(), CancelTokens, closing streams early). Checks: no crash or hang, every completed answer
equal to the single-threaded answer, RSS flat after warm-up. Writes bench/results/soak_<isa>.json.

    python bench/soak.py --minutes 6 --threads 8
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

import x2l_edge
from x2l_edge import CancelledError, CancelToken, _core, models

TEXT = ("The lighthouse keeper wrote in his log every evening: the wind, the ships that passed, the colour "
        "of the sea and the birds that rested on the gallery. ") * 10
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "A list of fruits: apple,",
           "The three primary colours are"]
QUESTIONS = ["What did the keeper write about?", "Where did the birds rest?", "What passed by?"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def isa() -> str:
    feats = _core.cpu_features()
    text = " ".join(feats) if isinstance(feats, (list, tuple)) else str(feats)
    return "AVX512" if "avx512f" in text.lower() else ("AVX2" if "avx2" in text.lower() else text)


def build_ops(s, ctx, max_tokens):
    eval_ids = s.tokenize("Numbers: one two three four five six seven eight")
    ops = {}
    for i, p in enumerate(PROMPTS):
        ops[f"gen{i}"] = lambda tok, p=p: s.generate(p, max_tokens=max_tokens, cancel=tok)
        ops[f"stream{i}"] = lambda tok, p=p: "".join(s.generate(p, max_tokens=max_tokens, stream=True, cancel=tok))
    ops["chat"] = lambda tok: s.chat("Name a colour.", max_tokens=max_tokens, cancel=tok)
    for i, q in enumerate(QUESTIONS):
        ops[f"ask{i}"] = lambda tok, q=q: ctx.ask(q, top_k=1, max_tokens=8, cancel=tok)
    ops["prefill_ask"] = lambda tok: s.prefill_text(TEXT[:500], chunk_tokens=48, cancel=tok).ask(
        QUESTIONS[0], top_k=1, max_tokens=8, cancel=tok)

    def eval_op(tok):
        with s.exclusive(cancel=tok):
            s.reset()
            return s.eval(eval_ids, all_logits=True)[-1].tobytes()

    ops["eval"] = eval_op
    return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the threads run (the issue asks 30)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--n-threads", type=int, default=2, help="the Session's compute threads")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--cancel-every", type=float, default=2.0, help="mean seconds between random cancels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    s = x2l_edge.Session(a.model or models.smollm2_path(), n_threads=a.n_threads, n_ctx=4096)
    ctx = s.prefill_text(TEXT, chunk_tokens=64)
    ops = build_ops(s, ctx, a.max_tokens)
    t0 = time.perf_counter()
    want = {name: op(None) for name, op in ops.items()}  # single-threaded references
    ref_seconds = time.perf_counter() - t0
    print(f"references: {len(want)} operations in {ref_seconds:.1f} s", flush=True)

    lock = threading.Lock()
    counts = {"completed": 0, "cancelled": 0, "mismatched": 0, "errors": 0, "streams_closed_early": 0}
    per_op: dict[str, int] = {}
    mismatches, errors = [], []
    tokens: list[CancelToken] = []
    stop_at = time.monotonic() + a.minutes * 60

    def worker(idx):
        rng = random.Random(a.seed * 1000 + idx)
        names = sorted(ops)
        while time.monotonic() < stop_at:
            name = rng.choice(names)
            tok = CancelToken() if rng.random() < 0.5 else None
            if tok is not None:
                with lock:
                    tokens.append(tok)
            try:
                if name.startswith("stream") and rng.random() < 0.15:
                    it = s.generate(PROMPTS[int(name[-1])], max_tokens=a.max_tokens, stream=True, cancel=tok)
                    next(it, None)
                    it.close()  # a client that went away
                    with lock:
                        counts["streams_closed_early"] += 1
                    continue
                got = ops[name](tok)
                with lock:
                    counts["completed"] += 1
                    per_op[name] = per_op.get(name, 0) + 1
                    if got != want[name]:
                        counts["mismatched"] += 1
                        mismatches.append({"op": name, "got": repr(got)[:200], "want": repr(want[name])[:200]})
            except CancelledError:
                with lock:
                    counts["cancelled"] += 1
            except Exception as e:  # noqa: BLE001 - every other exception is a failure, recorded
                with lock:
                    counts["errors"] += 1
                    errors.append(f"{name}: {type(e).__name__}: {e}")
            finally:
                if tok is not None:
                    with lock:
                        tokens.remove(tok)

    def canceller():
        rng = random.Random(a.seed)
        n = 0
        while time.monotonic() < stop_at:
            time.sleep(rng.expovariate(1.0 / a.cancel_every))
            if rng.random() < 0.5:
                s.cancel()
            else:
                with lock:
                    live = list(tokens)
                if live:
                    rng.choice(live).cancel()
            n += 1
        counts["cancel_requests"] = n

    rss = []
    start = time.monotonic()

    def sampler():
        while time.monotonic() < stop_at + 1:
            rss.append((round(time.monotonic() - start, 1), rss_bytes()))
            time.sleep(2.0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.threads)]
    threads += [threading.Thread(target=canceller, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for t in threads:
        t.start()
    hung = []
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.monotonic()) + 600)
        if t.is_alive():
            hung.append(t.name)
    wall = time.monotonic() - start

    # the session still answers normally after the soak
    after_ok = all(ops[n](None) == want[n] for n in ("gen0", "ask0", "eval"))

    warm = [b for t, b in rss if t >= 0.2 * wall] or [b for _, b in rss]
    ts = np.array([t for t, _ in rss if t >= 0.2 * wall] or [0.0])
    slope = float(np.polyfit(ts, np.array(warm, dtype=float), 1)[0]) if len(warm) > 2 else 0.0
    result = {
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "isa": isa(),
        "cpu_count": os.cpu_count(),
        "model": os.path.basename(a.model or models.smollm2_path()),
        "threads": a.threads,
        "session_n_threads": a.n_threads,
        "minutes_requested": a.minutes,
        "wall_seconds": round(wall, 1),
        "reference_seconds": round(ref_seconds, 1),
        "operations": sorted(ops),
        **counts,
        "completed_per_op": per_op,
        "hung_threads": hung,
        "answers_after_soak_equal": after_ok,
        "rss_mib": {"samples": len(rss), "after_warmup_min": round(min(warm) / 2**20, 1),
                    "after_warmup_max": round(max(warm) / 2**20, 1),
                    "after_warmup_slope_mib_per_min": round(slope * 60 / 2**20, 3),
                    "first": round(rss[0][1] / 2**20, 1) if rss else None,
                    "last": round(rss[-1][1] / 2**20, 1) if rss else None},
        "rss_trace_mib": [(t, round(b / 2**20, 1)) for t, b in rss],
        "mismatches": mismatches[:20],
        "error_messages": errors[:20],
        "ok": not hung and counts["mismatched"] == 0 and counts["errors"] == 0 and after_ok,
    }
    out = Path(a.out or Path(__file__).parent / "results" / f"soak_{result['isa'].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("rss_trace_mib", "operations", "completed_per_op")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
