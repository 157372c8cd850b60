"""Asking a video index while it is still being built (a live source): what a snapshot costs.

The shipped tiny VLM prefills a generated needle video chunk by chunk with ChunkedPrefill (as the server
does for a camera). After every `--every` chunks it takes a snapshot (a VideoContext over the chunks so
far, sharing their tier rows with the prefill) and asks the needle question on it. Recorded per snapshot:
the tiers' bytes so far, the seconds to make the snapshot, the RSS it adds while held (measured after
malloc_trim; it shares the L and H rows: only signatures, L positions and the decoder's buffers are new), the question's seconds, and
whether it chose the needle's chunk once that chunk was in. For comparison, the same question on an
index prefilled from the same chunks alone (the reference, which must agree). Writes
bench/results/live_snapshot.json and .md.

    python bench/live_snapshot.py --frames 120 --every 2 --threads 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402


def _rss() -> int:
    """Resident bytes after returning freed heap memory to the system (glibc malloc_trim), so that what a
    new object holds shows up rather than reused pages."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--every", type=int, default=2, help="snapshot after every N chunks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(bench_common.ROOT, "bench", "results", "live_snapshot.json"))
    a = ap.parse_args(argv)

    import numpy as np

    import x2l_edge
    from x2l_edge import tiny_vlm as T
    from x2l_edge.x2l import ChunkedPrefill, VideoContext, prefill_chunks, split_template

    s = x2l_edge.Session(str(T.build_gguf()), n_threads=a.threads)
    opts = x2l_edge.X2LOptions.for_model(s, video=True)
    vid = T.needle_video(a.seed, a.frames)
    prefix, suffix = split_template(s, T.SYSTEM)
    sink = s.tokenize(prefix)
    chunks = list(s.video_chunks(vid.frames, chunk_frames=opts.chunk_frames, max_frames=a.frames))
    q = T.QUESTIONS["word"]
    kw = dict(question_suffix=suffix, default_top_k=1, default_scorer=opts.scorer)

    run = ChunkedPrefill(s, sink_ids=sink, frames_per_chunk=opts.chunk_frames, options=opts)
    rows = []
    for i, embd in enumerate(chunks):
        t0 = time.perf_counter()
        run.add(embd, last=i == len(chunks) - 1)
        add_s = time.perf_counter() - t0
        n = i + 1
        if n % a.every and n != len(chunks):
            continue
        gc.collect()
        rss0 = _rss()
        t0 = time.perf_counter()
        snap = run.snapshot(**kw)
        snap_s = time.perf_counter() - t0
        rss_snap = _rss() - rss0
        t0 = time.perf_counter()
        chosen = snap.select(question=q, top_k=1)
        answer = snap.ask(q, chunks=chosen, max_tokens=8)
        ask_s = time.perf_counter() - t0
        m = snap.memory()
        # The reference: an index prefilled from these chunks alone answers the same.
        ref_index, _ = prefill_chunks(s, chunks[:n], sink_ids=sink, frames_per_chunk=opts.chunk_frames, options=opts)
        ref = VideoContext(s, ref_index, **kw)
        t0 = time.perf_counter()
        ref_answer = ref.ask(q, chunks=ref.select(question=q, top_k=1), max_tokens=8)
        ref_ask_s = time.perf_counter() - t0
        same_logits = bool(np.array_equal(snap.logits(q, chosen), ref.logits(q, chosen)))
        rows.append({"chunks": n, "low_bytes": m["low_bytes"], "high_bytes": m["high_bytes"],
                     "sink_bytes": m["sink_bytes"], "signature_bytes": m["signature_bytes"],
                     "add_chunk_s": round(add_s, 4), "snapshot_s": round(snap_s, 5), "snapshot_rss_bytes": rss_snap,
                     "ask_s": round(ask_s, 4), "reference_ask_s": round(ref_ask_s, 4), "chosen": chosen,
                     "needle_in": vid.needle_chunk < n, "needle_chosen": chosen == [vid.needle_chunk],
                     "answer": answer, "answer_ok": T.answer_ok(answer, vid.word) if vid.needle_chunk < n else None,
                     "same_answer_as_reference": answer == ref_answer, "same_logits_as_reference": same_logits,
                     "question_tokens": len(ref.question_ids(q))})
        print(json.dumps(rows[-1]), flush=True)
        del snap, ref, ref_index
    index, stats = run.finish()
    out = {"what": "ChunkedPrefill.snapshot(): asking an index while it is built (bench/live_snapshot.py)",
           "command": " ".join(["python", "bench/live_snapshot.py"] + (argv if argv is not None else sys.argv[1:])),
           "cpu": bench_common.cpu_name(), "isa": bench_common.isa_info(), "build": bench_common.build_info(),
           "model": "tiny VLM (x2l_edge.tiny_vlm)", "threads": a.threads, "frames": a.frames,
           "chunk_frames": opts.chunk_frames, "needle_chunk": vid.needle_chunk, "prefill_seconds": stats["seconds"],
           "rows": rows}
    bench_common.write_json(a.out, out)
    md = [f"# Live snapshots (bench/live_snapshot.py, {bench_common.cpu_name()}, "
          f"{bench_common.machine_isa()}, {a.threads} threads)", "",
          f"`{out['command']}`: tiny VLM, {a.frames} frames, {opts.chunk_frames} frames per chunk, needle in chunk "
          f"{vid.needle_chunk}. Snapshot RSS: what holding the snapshot adds (after malloc_trim): the decoder's "
          "question tail (KV of max_answer_tokens + 512 tokens, as for any VideoContext) plus the copied "
          "signatures; the L and H rows are shared, so it does not grow with them. Reference: an index "
          "prefilled from the same chunks alone (= reference: same answer and bit-identical logits).", "",
          "| chunks | L bytes | H bytes | signature bytes | snapshot s | snapshot RSS | ask s | reference ask s "
          "| chosen | answer ok | = reference |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['chunks']} | {r['low_bytes']} | {r['high_bytes']} | {r['signature_bytes']} | "
                  f"{r['snapshot_s']:.4f} | "
                  f"{r['snapshot_rss_bytes']} | {r['ask_s']:.3f} | {r['reference_ask_s']:.3f} | {r['chosen']} | "
                  f"{r['answer_ok']} | {r['same_answer_as_reference'] and r['same_logits_as_reference']} |")
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
