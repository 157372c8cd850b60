"""Soak test of one shared Session (issue 24): N threads mix generate (plain and streamed), chat, eval,
prefill_text + ask, questions on a shared text index and on a shared video index, and whole video
questions (decode + vision tower + X²L prefill + ask), while a canceller thread cancels at random
(Session.cancel(), CancelTokens, closing streams early). One Session serves all of it, as the server's:
the shipped tiny VLM (SmolLM2-135M-Instruct + a 4 MB vision tower), so text and video share it.

Checks: no crash or hang; every completed answer equal to the single-threaded answer; RSS flat after
warm-up. The RSS criterion: the least-squares slope of RSS over the last two thirds of the run is below
--rss-slope-bound MiB/min (default 0.25, i.e. < 5 MiB over the last 20 minutes of a 30-minute run, against
RSS swings of ~+-15 MiB between samples from what the running operation holds). Each
sample also records glibc's heap (in use / free, mallinfo2) and Python's allocated blocks, which tell a
leak (memory in use grows) from allocator retention (free heap grows while in-use is flat).

    nice -n 10 python bench/soak.py --minutes 30          # writes bench/results/soak_<isa>.json + .md
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import tempfile
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
VIDEO_QUESTIONS = ["What is the secret word?", "What colour is the first shape?"]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def heap() -> tuple[int, int]:
    """(bytes malloc has handed out and not got back, incl. mmapped chunks; free bytes it keeps), over all arenas."""
    if _mallinfo2 is None:
        return -1, -1
    m = _mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


def isa() -> str:
    feats = _core.cpu_features()
    text = " ".join(feats) if isinstance(feats, (list, tuple)) else str(feats)
    return "AVX512" if "avx512f" in text.lower() else ("AVX2" if "avx2" in text.lower() else text)


def slope_per_min(ts, ys) -> float:
    """Least-squares slope of ys (bytes) over ts (s), in MiB/min."""
    if len(ts) < 3:
        return 0.0
    return float(np.polyfit(np.asarray(ts, float), np.asarray(ys, float), 1)[0]) * 60 / 2**20


def build_ops(s, ctx, vctx, video, max_tokens):
    eval_ids = s.tokenize("Numbers: one two three four five six seven eight")
    ops = {}
    for i, p in enumerate(PROMPTS):
        ops[f"gen{i}"] = lambda tok, p=p: s.generate(p, max_tokens=max_tokens, cancel=tok)
        ops[f"stream{i}"] = lambda tok, p=p: "".join(s.generate(p, max_tokens=max_tokens, stream=True, cancel=tok))
    ops["chat"] = lambda tok: s.chat("Name a colour.", max_tokens=max_tokens, cancel=tok)
    for i, q in enumerate(QUESTIONS):
        ops[f"ask{i}"] = lambda tok, q=q: ctx.ask(q, top_k=1, max_tokens=8, cancel=tok)
    ops["prefill_ask"] = lambda tok: s.prefill_text(TEXT[:500], chunk_tokens=48, progress=False, cancel=tok).ask(
        QUESTIONS[0], top_k=1, max_tokens=8, cancel=tok)
    for i, q in enumerate(VIDEO_QUESTIONS):
        ops[f"video_ask{i}"] = lambda tok, q=q: vctx.ask(q, max_tokens=8, cancel=tok)
    # the whole path a new video takes: decode, vision tower, X²L prefill, question
    ops["video_full"] = lambda tok: s.ask(str(video), VIDEO_QUESTIONS[0], max_tokens=8, progress=False, cancel=tok)

    def eval_op(tok):
        with s.exclusive(cancel=tok):
            s.reset()
            return s.eval(eval_ids, all_logits=True)[-1].tobytes()

    ops["eval"] = eval_op
    return ops


def write_md(result: dict, path: Path) -> None:
    r = result
    m = r["rss_mib"]
    lines = [
        f"# Soak: one Session, {r['threads']} threads, {r['minutes_requested']:g} minutes ({r['isa']})",
        "",
        f"`{r['command']}` — {r['cpu_model']}, {r['cpu_count']} cores shared with other jobs (load average "
        f"{r['load']['mean_1min']:.1f} on average during the run, {r['load']['min_1min']:.1f}-{r['load']['max_1min']:.1f}; "
        f"this process at nice {r['nice']}). glibc heap: mmap threshold "
        f"{'fixed (x2l_edge/heap.py, as the server)' if r['mmap_threshold_fixed'] else 'dynamic (glibc default)'}"
        f"{', malloc_trim before every sample' if r['malloc_trim_before_samples'] else ''}.",
        f"Model: {r['model']} (one Session for text and video). Wall {r['wall_seconds'] / 60:.1f} min.",
        "",
        "| | |",
        "|---|---|",
        f"| completed operations | {r['completed']} (mismatched with the single-threaded answer: {r['mismatched']}) |",
        f"| cancelled (CancelledError) | {r['cancelled']} of {r['cancel_requests']} cancel requests |",
        f"| streams closed early | {r['streams_closed_early']} |",
        f"| other errors | {r['errors']} |",
        f"| hung threads | {len(r['hung_threads'])} |",
        f"| answers after the soak equal | {r['answers_after_soak_equal']} |",
        f"| RSS first / after warm-up min-max / last (MiB) | {m['first']} / {m['after_warmup_min']}-{m['after_warmup_max']} / {m['last']} |",
        f"| RSS median per third of the run (MiB) | {' / '.join(str(v) for v in m['median_per_third'])} |",
        f"| RSS slope, last two thirds | {m['slope_last_two_thirds_mib_per_min']:+.3f} MiB/min (bound {r['rss_criterion']['bound_mib_per_min']}: "
        f"{'flat' if r['rss_criterion']['flat'] else 'NOT flat'}) |",
        f"| heap in use slope, last two thirds | {r['heap_mib']['in_use_slope_last_two_thirds_mib_per_min']:+.3f} MiB/min |",
        f"| Python blocks, first third end / last | {r['python_blocks']['at_one_third']} / {r['python_blocks']['last']} |",
        f"| ok | **{r['ok']}** |",
        "",
        "Completed per operation: " + ", ".join(f"{k} {v}" for k, v in sorted(r["completed_per_op"].items())) + ".",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the threads run (the issue asks 30)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--n-threads", type=int, default=2, help="the Session's compute threads")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--cancel-every", type=float, default=6.0, help="mean seconds between random cancels")
    ap.add_argument("--rss-slope-bound", type=float, default=0.25,
                    help="MiB/min: RSS counts as flat when its slope over the last two thirds is below this")
    ap.add_argument("--glibc-default-heap", action="store_true",
                    help="diagnosis: leave glibc's dynamic mmap threshold on (the server fixes it: x2l_edge/heap.py)")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="diagnosis: malloc_trim(0) before every RSS sample (returns glibc's free pages)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="GGUF with a vision tower (default: the shipped tiny VLM)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from x2l_edge import tiny_vlm as T
    from x2l_edge.video import write_video

    from x2l_edge.heap import fix_mmap_threshold

    threshold_fixed = False if a.glibc_default_heap else fix_mmap_threshold()  # as `x2l-edge serve` does
    model = a.model or models.tiny_vlm_path()
    workdir = Path(tempfile.mkdtemp(prefix="x2l_soak_"))
    video = workdir / "needle.mp4"
    write_video(video, T.needle_video(3, 20).frames, fps=1.0)  # 20 frames, 2 chunks, a secret word among them

    s = x2l_edge.Session(model, n_threads=a.n_threads, n_ctx=4096)
    ctx = s.prefill_text(TEXT, chunk_tokens=64, progress=False)
    vctx = s.prefill(str(video), progress=False)
    ops = build_ops(s, ctx, vctx, video, a.max_tokens)
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

    # (t, rss, heap in use, heap free, python blocks, load 1 min) per sample, preallocated so that the
    # sampler itself adds no Python objects while it runs
    trace = np.zeros((int(a.minutes * 60 / a.sample_every) + 200, 6))
    n_samples = 0
    start = time.monotonic()

    def sampler():
        nonlocal n_samples
        while time.monotonic() < stop_at + 1 and n_samples < len(trace):
            if a.malloc_trim:
                _libc.malloc_trim(0)
            used, free = heap()
            trace[n_samples] = (time.monotonic() - start, rss_bytes(), used, free, sys.getallocatedblocks(),
                                os.getloadavg()[0])
            n_samples += 1
            time.sleep(a.sample_every)

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
    samples = [(round(float(t), 1), int(r), int(u), int(f), int(b), float(ld)) for t, r, u, f, b, ld in trace[:n_samples]]

    # the session still answers normally after the soak
    after_ok = all(ops[n](None) == want[n] for n in ("gen0", "ask0", "eval", "video_ask0", "video_full"))

    warm = [x for x in samples if x[0] >= wall / 3] or samples
    col = lambda rows, i: [r[i] for r in rows]  # noqa: E731
    rss_slope = slope_per_min(col(warm, 0), col(warm, 1))
    flat = rss_slope < a.rss_slope_bound
    one_third = warm[0] if warm else None
    loads = col(samples, 5)
    with open("/proc/cpuinfo") as f:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    result = {
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "isa": isa(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "nice": os.nice(0),
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "malloc_trim_before_samples": a.malloc_trim,
        "mmap_threshold_fixed": threshold_fixed,
        "malloc_mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "load": {"mean_1min": round(float(np.mean(loads)), 2) if loads else None,
                 "min_1min": round(min(loads), 2) if loads else None,
                 "max_1min": round(max(loads), 2) if loads else None},
        "model": os.path.basename(model),
        "threads": a.threads,
        "session_n_threads": a.n_threads,
        "minutes_requested": a.minutes,
        "cancel_every_s": a.cancel_every,
        "wall_seconds": round(wall, 1),
        "reference_seconds": round(ref_seconds, 1),
        "operations": sorted(ops),
        **counts,
        "completed_per_op": per_op,
        "hung_threads": hung,
        "answers_after_soak_equal": after_ok,
        "rss_criterion": {"rule": "least-squares slope of RSS over the last two thirds of the run < bound",
                          "bound_mib_per_min": a.rss_slope_bound, "flat": flat},
        "rss_mib": {"samples": len(samples), "after_warmup_min": round(min(col(warm, 1)) / 2**20, 1),
                    "after_warmup_max": round(max(col(warm, 1)) / 2**20, 1),
                    "slope_last_two_thirds_mib_per_min": round(rss_slope, 3),
                    "first": round(samples[0][1] / 2**20, 1), "last": round(samples[-1][1] / 2**20, 1),
                    "median_per_third": [round(float(np.median([x[1] for x in samples
                                                                if k * wall / 3 <= x[0] < (k + 1) * wall / 3] or [0])) / 2**20, 1)
                                         for k in range(3)]},
        "heap_mib": {"in_use_at_one_third": round(one_third[2] / 2**20, 1),
                     "in_use_last": round(samples[-1][2] / 2**20, 1),
                     "in_use_slope_last_two_thirds_mib_per_min": round(slope_per_min(col(warm, 0), col(warm, 2)), 3),
                     "free_at_one_third": round(one_third[3] / 2**20, 1),
                     "free_last": round(samples[-1][3] / 2**20, 1)},
        "python_blocks": {"at_one_third": one_third[4], "last": samples[-1][4]},
        "trace": {"columns": ["t_s", "rss_mib", "heap_in_use_mib", "heap_free_mib", "python_blocks", "load_1min"],
                  "rows": [(t, round(r / 2**20, 1), round(u / 2**20, 1), round(f / 2**20, 1), b, round(ld, 2))
                           for t, r, u, f, b, ld in samples]},
        "mismatches": mismatches[:20],
        "error_messages": errors[:20],
    }
    result["ok"] = bool(not hung and counts["mismatched"] == 0 and counts["errors"] == 0 and after_ok and flat)
    out = Path(a.out or Path(__file__).parent / "results" / f"soak_{result['isa'].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result["trace"]["rows"]
    result["trace"]["rows"] = "@ROWS@"  # one sample per line
    text = json.dumps(result, indent=1).replace('"@ROWS@"', "[\n  " + ",\n  ".join(json.dumps(r) for r in rows) + "\n ]")
    result["trace"]["rows"] = rows
    out.write_text(text + "\n")
    write_md(result, out.with_suffix(".md"))
    summary = {k: v for k, v in result.items() if k not in ("trace", "operations", "completed_per_op")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
