#!/usr/bin/env python3
"""VNBench-style synthetic video needles: generator + evaluation through Session.prefill / ask.

Haystack frames are random (smooth colour background, random circles / rectangles / ellipses / lines, pixel
noise); needles are inserted for a few consecutive frames inside a known chunk:
  caption   a white card with the rendered text "The secret word is" / WORD (cv2.putText)
  image     a white card with a coloured object drawn on it (star, heart, arrow, cross, ...)

Tasks (4 options each, asked in 4 rotations; an item is correct only if every rotation is right):
  retrieval_caption  "What is the secret word shown in the video?"
  retrieval_image    "Which object is shown on a white card in the video?"
  ordering           two caption needles in two chunks: which word appears first, then second
  counting           one object card shown in k different chunks: how many times does it appear

    python bench/video_needles.py generate OUT_DIR --items 4 --chunks 8 --chunk-frames 10
    python bench/video_needles.py evaluate MODEL.gguf OUT_DIR/video_needles.json --modes full h_only x2l

Videos are written with x2l_edge.video.write_video (lossless FFV1 in .mkv by default, so what the model
reads is exactly what was generated); the JSON holds questions, rotations, answers, needle frames and needle
chunk indices (frame // chunk_frames). evaluate() feeds every frame (max_frames = the video's frame count)
in chunks of chunk_frames frames, so chunk c of the model is exactly frames [c*chunk_frames, (c+1)*chunk_frames).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

WORDS = ["PINEAPPLE", "ELEPHANT", "VIOLIN", "TORNADO", "GIRAFFE", "AVOCADO", "PENGUIN", "VOLCANO", "SAXOPHONE",
         "DINOSAUR", "CACTUS", "LIGHTHOUSE", "KANGAROO", "TELESCOPE", "BUTTERFLY", "SUBMARINE"]
OBJECTS = ["star", "heart", "arrow", "cross", "triangle", "diamond", "ring", "moon"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 170, 40), "orange": (240, 140, 0),
           "purple": (140, 40, 180), "black": (10, 10, 10)}
TASKS = ("retrieval_caption", "retrieval_image", "ordering", "counting")
LETTERS = "ABCD"


# ---------------------------------------------------------------------------------------------- drawing
def _cv2():
    import cv2

    return cv2


def haystack_frame(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random frame: smooth two-colour gradient, 3-7 random shapes, uniform noise. Never near-white."""
    cv2 = _cv2()
    c0, c1 = rng.integers(20, 200, size=(2, 3))
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + 0.5 * (np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None] - 0.5), 0, 1)[..., None]
    img = (c0[None, None, :] * (1 - ramp) + c1[None, None, :] * ramp).astype(np.uint8)
    img = np.ascontiguousarray(img)
    for _ in range(int(rng.integers(3, 8))):
        col = tuple(int(x) for x in rng.integers(0, 200, size=3))
        kind = int(rng.integers(0, 4))
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        r = int(rng.integers(size // 16, size // 5))
        if kind == 0:
            cv2.circle(img, (x, y), r, col, -1)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + r, y + int(r * rng.uniform(0.5, 1.5))), col, -1)
        elif kind == 2:
            cv2.ellipse(img, (x, y), (r, max(2, r // 2)), float(rng.uniform(0, 180)), 0, 360, col, -1)
        else:
            x2, y2 = (int(v) for v in rng.integers(0, size, size=2))
            cv2.line(img, (x, y), (x2, y2), col, int(rng.integers(2, 6)))
    noise = rng.integers(-8, 9, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 225).astype(np.uint8)


def _card(img: np.ndarray, frac: float = 0.7) -> tuple[int, int, int, int]:
    cv2 = _cv2()
    h, w = img.shape[:2]
    cw, ch = int(w * frac), int(h * frac * 0.7)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    cv2.rectangle(img, (x0, y0), (x0 + cw, y0 + ch), (255, 255, 255), -1)
    return x0, y0, cw, ch


def draw_caption(img: np.ndarray, word: str) -> np.ndarray:
    """White card with "The secret word is" / WORD in black, scaled to the frame."""
    cv2 = _cv2()
    img = img.copy()
    x0, y0, cw, ch = _card(img)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for text, row in (("The secret word is", 0.38), (word, 0.78)):
        scale, thick = 1.0, 1
        (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
        scale = min(2.0, 0.9 * cw / tw, 0.35 * ch / th)
        thick = max(1, int(round(scale * 1.5)))
        (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
        cv2.putText(img, text, (x0 + (cw - tw) // 2, y0 + int(ch * row) + th // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    return img


def _object_points(kind: str, cx: float, cy: float, r: float) -> list[np.ndarray]:
    ang = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
    if kind == "star":
        rr = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        return [np.stack([cx + rr * np.cos(ang), cy + rr * np.sin(ang)], 1)]
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 60)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([cx + x * r / 17, cy + y * r / 17], 1)]
    if kind == "arrow":
        p = [(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)]
    elif kind == "cross":
        p = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
             (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
    elif kind == "triangle":
        p = [(0, -1), (0.95, 0.8), (-0.95, 0.8)]
    elif kind == "diamond":
        p = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif kind == "ring":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1),
                np.stack([cx + 0.55 * r * np.cos(t), cy + 0.55 * r * np.sin(t)], 1)]
    elif kind == "moon":
        t = np.linspace(-np.pi / 2, np.pi / 2, 30)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        inner = np.stack([0.45 * np.cos(t[::-1]), np.sin(t[::-1])], 1)
        p = np.concatenate([outer, inner])
    else:
        raise ValueError(f"unknown object {kind!r}")
    p = np.asarray(p, dtype=np.float64)
    return [np.stack([cx + p[:, 0] * r, cy + p[:, 1] * r], 1)]


def draw_object(img: np.ndarray, kind: str, colour: str) -> np.ndarray:
    """White card with a coloured object on it (an 'inserted image' needle)."""
    cv2 = _cv2()
    img = img.copy()
    x0, y0, cw, ch = _card(img)
    polys = [np.round(p).astype(np.int32) for p in _object_points(kind, x0 + cw / 2, y0 + ch / 2, 0.42 * min(cw, ch))]
    col = COLOURS[colour]
    if kind == "ring":
        cv2.fillPoly(img, [polys[0]], col, cv2.LINE_AA)
        cv2.fillPoly(img, [polys[1]], (255, 255, 255), cv2.LINE_AA)
    else:
        cv2.fillPoly(img, polys, col, cv2.LINE_AA)
    return img


# ---------------------------------------------------------------------------------------------- items
def _rotations(question: str, options: list[str], answer: int) -> list[dict]:
    out = []
    for r in range(len(options)):
        opts = options[r:] + options[:r]
        body = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(opts))
        out.append({"rotation": r, "options": opts, "answer": LETTERS[(answer - r) % len(options)],
                    "prompt": f"{question}\n{body}\nAnswer with the option's letter from the given choices directly."})
    return out


def _needle_start(rng, chunk: int, chunk_frames: int, needle_frames: int) -> int:
    return chunk * chunk_frames + int(rng.integers(0, chunk_frames - needle_frames + 1))


def make_item(task: str, idx: int, *, n_chunks: int = 8, chunk_frames: int = 10, needle_frames: int = 2,
              size: int = 224, seed: int = 0) -> tuple[dict, np.ndarray]:
    """One deterministic item: (metadata, frames uint8 [T, size, size, 3])."""
    if needle_frames > chunk_frames:
        raise ValueError("needle_frames must be <= chunk_frames")
    if size % 2:
        raise ValueError("size must be even (video encoders need even dimensions)")
    rng = np.random.default_rng([seed, TASKS.index(task), idx])
    n_frames = n_chunks * chunk_frames
    frames = np.stack([haystack_frame(np.random.default_rng([seed, 7919, TASKS.index(task), idx, f]), size)
                       for f in range(n_frames)])
    needles = []  # (chunk, first frame, kind, payload)

    def put(chunk, draw):
        f0 = _needle_start(rng, chunk, chunk_frames, needle_frames)
        for f in range(f0, f0 + needle_frames):
            frames[f] = draw(frames[f])
        return list(range(f0, f0 + needle_frames))

    meta = {"task": task, "idx": idx, "n_chunks": n_chunks, "chunk_frames": chunk_frames, "n_frames": n_frames,
            "needle_frames_per_needle": needle_frames, "size": size, "seed": seed}
    if task == "retrieval_caption":
        words = [str(w) for w in rng.choice(WORDS, size=4, replace=False)]
        c = int(rng.integers(0, n_chunks))
        fr = put(c, lambda im: draw_caption(im, words[0]))
        needles.append({"chunk": c, "frames": fr, "kind": "caption", "word": words[0]})
        options, answer = _shuffle(rng, words, 0)
        question = "What is the secret word shown in the video?"
    elif task == "retrieval_image":
        objs = _distinct_objects(rng, 4)
        c = int(rng.integers(0, n_chunks))
        fr = put(c, lambda im: draw_object(im, *objs[0]))
        needles.append({"chunk": c, "frames": fr, "kind": "image", "object": objs[0][0], "colour": objs[0][1]})
        options, answer = _shuffle(rng, [f"a {col} {o}" for o, col in objs], 0)
        question = "Which object is shown on a white card in the video?"
    elif task == "ordering":
        w = [str(x) for x in rng.choice(WORDS, size=3, replace=False)]
        c1, c2 = sorted(int(x) for x in rng.choice(n_chunks, size=2, replace=False))
        for c, word in ((c1, w[0]), (c2, w[1])):
            fr = put(c, lambda im, word=word: draw_caption(im, word))
            needles.append({"chunk": c, "frames": fr, "kind": "caption", "word": word})
        cands = [f"{w[0]}, then {w[1]}", f"{w[1]}, then {w[0]}", f"{w[0]}, then {w[2]}", f"{w[2]}, then {w[1]}"]
        options, answer = _shuffle(rng, cands, 0)
        question = "Two secret words are shown in the video, one after the other. In which order do they appear?"
    elif task == "counting":
        obj, col = _distinct_objects(rng, 1)[0]
        k = int(rng.integers(1, min(5, n_chunks) + 1))
        for c in sorted(int(x) for x in rng.choice(n_chunks, size=k, replace=False)):
            fr = put(c, lambda im: draw_object(im, obj, col))
            needles.append({"chunk": c, "frames": fr, "kind": "image", "object": obj, "colour": col})
        nums = [k] + [int(x) for x in rng.choice([n for n in range(1, 8) if n != k], size=3, replace=False)]
        options, answer = _shuffle(rng, [str(n) for n in nums], 0)
        question = (f"A white card with a {col} {obj} appears several times in the video. How many times does it "
                    "appear?")
        meta["count"] = k
    else:
        raise ValueError(f"unknown task {task!r}")
    meta.update(question=question, options=options, answer_index=answer, answer=options[answer], needles=needles,
                needle_frames=sorted(f for n in needles for f in n["frames"]),
                needle_chunks=sorted({n["chunk"] for n in needles}), rotations=_rotations(question, options, answer))
    return meta, frames


def _shuffle(rng, options: list[str], correct: int) -> tuple[list[str], int]:
    perm = [int(x) for x in rng.permutation(len(options))]
    return [options[j] for j in perm], perm.index(correct)


def _distinct_objects(rng, n: int) -> list[tuple[str, str]]:
    objs = [str(o) for o in rng.choice(OBJECTS, size=n, replace=False)]
    cols = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    return list(zip(objs, cols))


def generate(out_dir: str, *, tasks=TASKS, items: int = 4, n_chunks: int = 8, chunk_frames: int = 10,
             needle_frames: int = 2, size: int = 224, fps: float = 2.0, seed: int = 0, codec: str = "FFV1",
             ext: str = ".mkv") -> str:
    """Write items per task as video files plus OUT_DIR/video_needles.json; returns the JSON path."""
    from x2l_edge.video import write_video

    os.makedirs(out_dir, exist_ok=True)
    records = []
    for task in tasks:
        for i in range(items):
            meta, frames = make_item(task, i, n_chunks=n_chunks, chunk_frames=chunk_frames,
                                     needle_frames=needle_frames, size=size, seed=seed)
            name = f"{task}_{i:03d}{ext}"
            write_video(os.path.join(out_dir, name), frames, fps=fps, codec=codec)
            meta["video"] = name
            meta["fps"] = fps
            records.append(meta)
    path = os.path.join(out_dir, "video_needles.json")
    with open(path, "w") as f:
        json.dump({"generator": "video_needles", "seed": seed, "codec": codec, "fps": fps, "size": size,
                   "n_chunks": n_chunks, "chunk_frames": chunk_frames, "needle_frames": needle_frames,
                   "tasks": list(tasks), "items": records}, f, indent=1)
    return path


# ---------------------------------------------------------------------------------------------- evaluation
def parse_letter(output: str, options: list[str]) -> str | None:
    """The option letter of an answer: a leading 'A'/'(A)'/'A.', else the option whose text it contains."""
    m = re.match(r"\s*\(?([ABCD])\b", output)
    if m:
        return m.group(1)
    low = output.lower()
    hits = [LETTERS[j] for j, o in enumerate(options) if o.lower() in low]
    return hits[0] if len(hits) == 1 else None


def evaluate(model_path: str, json_path: str, *, modes=("full", "h_only", "x2l"), scorers=("keys",),
             top_k: int = 1, n_threads: int = 0, max_items: int | None = None, max_tokens: int = 8,
             ratio_low: int | None = None, ratio_high: int | None = None, n_ctx: int = 0, progress=None) -> dict:
    """Run every item (all 4 rotations) through a converted multimodal GGUF in the given modes:
    full (uncompressed KV), h_only (no reload), x2l (top_k chunks by each scorer reloaded; also 'oracle').
    Returns per-mode circular accuracy, per-rotation accuracy and selector recall, plus per-item details."""
    import x2l_edge
    from x2l_edge.generation import generate_ids, stream_text
    from x2l_edge.x2l import split_template

    with open(json_path) as f:
        spec = json.load(f)
    base = os.path.dirname(os.path.abspath(json_path))
    items = spec["items"][:max_items] if max_items else spec["items"]
    if not n_ctx:  # room for every frame of the longest video + the longest question and answer
        probe = x2l_edge.Session(model_path, n_threads=1, n_ctx=16)
        tpf = probe.vision.tokens_per_frame
        del probe
        n_ctx = max(it["n_frames"] for it in items) * tpf + 512 + max_tokens
    s = x2l_edge.Session(model_path, n_threads=n_threads, n_ctx=n_ctx)
    x2l_opts = {k: v for k, v in (("ratio_low", ratio_low), ("ratio_high", ratio_high)) if v is not None}
    cells = []
    for m in modes:
        if m == "x2l":
            cells += [f"{sc}@{top_k}" for sc in scorers]
        else:
            cells.append(m)
    details = []
    t_all = time.perf_counter()
    for n_done, it in enumerate(items):
        video = os.path.join(base, it["video"])
        cf, nf = it["chunk_frames"], it["n_frames"]
        rec = {"video": it["video"], "task": it["task"], "needle_chunks": it["needle_chunks"], "cells": {}}
        t0 = time.perf_counter()
        if "full" in modes:
            prefix, suffix = split_template(s, None)
            s.reset()
            s._s.eval(s.tokenize(prefix))
            for embd in s.video_chunks(video, chunk_frames=cf, max_frames=nf):
                s._s.eval_embd(embd)
            hist = list(s._s.history)
            outs = []
            for rot in it["rotations"]:  # the video prefix stays cached: only the question is evaluated
                ids = hist + s.tokenize("\n" + rot["prompt"] + suffix)
                gen = generate_ids(s._s, ids, stop_ids=s._stop_ids, max_tokens=max_tokens)
                outs.append("".join(stream_text(s._tok, gen, [])))
            rec["cells"]["full"] = _score(it, outs)
            s.reset()
        ctx = None
        if any(m in modes for m in ("h_only", "x2l", "oracle")):
            ctx = s.prefill(video, chunk_frames=cf, max_frames=nf, **x2l_opts)
            assert ctx.n_chunks == it["n_chunks"], (ctx.n_chunks, it["n_chunks"])
            rec["memory"] = {k: int(v) for k, v in ctx.memory().items()}
        if "h_only" in modes:
            rec["cells"]["h_only"] = _score(it, [ctx.ask(r["prompt"], chunks=[], max_tokens=max_tokens)
                                                 for r in it["rotations"]])
        if "oracle" in modes:
            rec["cells"]["oracle"] = _score(it, [ctx.ask(r["prompt"], chunks=it["needle_chunks"], max_tokens=max_tokens)
                                                 for r in it["rotations"]])
        if "x2l" in modes:
            for sc in scorers:
                outs, recalls = [], []
                for r in it["rotations"]:
                    sel = ctx.select(ctx.scores(r["prompt"], sc), top_k=top_k)
                    recalls.append(len(set(sel) & set(it["needle_chunks"])) / len(it["needle_chunks"]))
                    outs.append(ctx.ask(r["prompt"], chunks=sel, max_tokens=max_tokens))
                cell = _score(it, outs)
                cell["recall"] = sum(recalls) / len(recalls)
                rec["cells"][f"{sc}@{top_k}"] = cell
        del ctx
        rec["seconds"] = time.perf_counter() - t0
        details.append(rec)
        if progress:
            progress(n_done + 1, len(items))
    summary = {}
    for c in cells:
        rs = [d["cells"][c] for d in details if c in d["cells"]]
        if not rs:
            continue
        summary[c] = {"n": len(rs), "circular_acc": sum(r["correct"] for r in rs) / len(rs),
                      "rotation_acc": sum(r["rotations_right"] for r in rs) / (4 * len(rs))}
        if "recall" in rs[0]:
            summary[c]["recall"] = sum(r["recall"] for r in rs) / len(rs)
        by_task = {}
        for d in details:
            if c in d["cells"]:
                by_task.setdefault(d["task"], []).append(d["cells"][c]["correct"])
        summary[c]["by_task"] = {t: sum(v) / len(v) for t, v in by_task.items()}
    return {"model": os.path.basename(model_path), "json": os.path.abspath(json_path), "modes": list(modes),
            "scorers": list(scorers), "top_k": top_k, "n_items": len(details), "seconds": time.perf_counter() - t_all,
            "summary": summary, "items": details}


def _score(item: dict, outputs: list[str]) -> dict:
    got = [parse_letter(o, r["options"]) for o, r in zip(outputs, item["rotations"])]
    right = [g == r["answer"] for g, r in zip(got, item["rotations"])]
    return {"outputs": outputs, "letters": got, "rotations_right": sum(right), "correct": all(right)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write videos + video_needles.json")
    g.add_argument("out_dir")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    g.add_argument("--items", type=int, default=4, help="items per task")
    g.add_argument("--chunks", type=int, default=8)
    g.add_argument("--chunk-frames", type=int, default=10)
    g.add_argument("--needle-frames", type=int, default=2)
    g.add_argument("--size", type=int, default=224)
    g.add_argument("--fps", type=float, default=2.0)
    g.add_argument("--codec", default="FFV1", choices=["FFV1", "MJPG", "mp4v"])
    g.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="run a converted multimodal GGUF on a generated set")
    e.add_argument("model")
    e.add_argument("json")
    e.add_argument("--modes", nargs="+", default=["full", "h_only", "oracle", "x2l"],
                   choices=["full", "h_only", "oracle", "x2l"])
    e.add_argument("--scorers", nargs="+", default=["keys", "attention", "embedding"])
    e.add_argument("--top-k", type=int, default=1)
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--max-items", type=int)
    e.add_argument("--max-tokens", type=int, default=8)
    e.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        ext = {"FFV1": ".mkv", "MJPG": ".avi", "mp4v": ".mp4"}[a.codec]
        path = generate(a.out_dir, tasks=a.tasks, items=a.items, n_chunks=a.chunks, chunk_frames=a.chunk_frames,
                        needle_frames=a.needle_frames, size=a.size, fps=a.fps, seed=a.seed, codec=a.codec, ext=ext)
        print("wrote", path)
        return 0
    res = evaluate(a.model, a.json, modes=a.modes, scorers=a.scorers, top_k=a.top_k, n_threads=a.threads,
                   max_items=a.max_items, max_tokens=a.max_tokens,
                   progress=lambda d, n: print(f"\r{d}/{n} items", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    for c, v in res["summary"].items():
        rec = f"  recall@{res['top_k']} {v['recall']:.2f}" if "recall" in v else ""
        print(f"{c:16s} circular acc {v['circular_acc']:.2f}  per-rotation {v['rotation_acc']:.2f}{rec}  (n={v['n']})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
