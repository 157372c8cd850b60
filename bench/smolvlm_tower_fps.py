#!/usr/bin/env python3
"""Frames per second through SmolVLM2-256M's vision tower on the CPU: x2l-edge next to llama.cpp's mtmd.

    python bench/smolvlm_tower_fps.py [--reps 3] [--threads 2] [--outtypes f32 q8_0] \\
        [--out bench/results/smolvlm_tower_fps_avx2.json]

The tower has SmolVLM2-256M-Video-Instruct's vision config (SigLIP-B/16 at 512 px: width 768, 12 blocks,
12 heads, MLP 3072, 32x32 = 1024 patches, pixel shuffle 4 -> 64 tokens of width 576) with seeded random
weights (tests/vlm_refs.make_tiny_smolvlm with overrides; the values do not change the work) and a
one-layer LLM of SmolLM2-135M's width (mtmd needs a model of the projector's width). llama.cpp's own
converter (tools/llama_cpp_converter.py) writes the model.gguf + mmproj.gguf pair; both runtimes read the
same mmproj file. One 512x512 frame per encode (video frames are never tiled); preprocessing is not
timed. x2l-edge: _core.VisionEncoder.encode on one normalised frame. mtmd (llama-cpp-python 0.3.36,
built -march=native = AVX2 here): mtmd_encode_chunk on the frame's overview chunk (the processor's
longest edge set to 512, so it is one 512x512 image). The two are timed interleaved, `reps` encodes each
per round after a warm-up, best and median of the rounds reported, with their ratio; both outputs are
compared (relative RMS) with each other and with the float64 NumPy tower of tests/vlm_numpy.py on the
checkpoint's own tensors (the random 12-block tower amplifies rounding more than a trained one would).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools"), str(ROOT / "bench")]

import bench_common  # noqa: E402
import llama_cpp_converter  # noqa: E402
import vlm_numpy as vn  # noqa: E402
import vlm_refs  # noqa: E402

VISION_256M = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=512, patch_size=16)
TEXT_135M_WIDTH = dict(hidden_size=576, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536)


def run(outtype: str, model_path: Path, mmproj_path: Path, img: np.ndarray, reps: int, rounds: int,
        n_threads: int, reference: np.ndarray) -> dict:
    import x2l_edge._core as core

    from x2l_edge import smolvlm

    enc = core.VisionEncoder.from_gguf(str(mmproj_path), n_threads=n_threads)
    cfg = enc.config
    px = smolvlm.preprocess([img], cfg["image_size"], cfg["image_mean"], cfg["image_std"])  # 512x512: no resize
    mt = bench_common.Mtmd(model_path, mmproj_path, [img], n_threads)
    ours_out, theirs_all = enc.encode(px), mt.encode()  # warm-up, and the outputs to compare
    # mtmd's idefics3 preprocessing gives the overview and one tile of the same 512x512 pixels in one
    # chunk: one encode runs the tower on each, so its time per frame is the chunk's over that count.
    per_chunk = theirs_all.shape[0] // ours_out.shape[0]
    theirs_out = theirs_all[:ours_out.shape[0]]
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(bench_common.timed(lambda: enc.encode(px), reps))
        theirs.append(bench_common.timed(mt.encode, reps) / per_chunk)
    mt.close()
    row = {"outtype": outtype, "tokens_per_frame": int(ours_out.shape[0]), "mtmd_chunk_tokens": int(theirs_all.shape[0]),
           "mtmd_tower_runs_per_encode": int(per_chunk),
           "rel_rms_x2l_vs_mtmd": bench_common.rel_rms(ours_out, theirs_out),
           "rel_rms_x2l_vs_float64": bench_common.rel_rms(ours_out, reference),
           "rel_rms_mtmd_vs_float64": bench_common.rel_rms(theirs_out, reference)}
    row.update(bench_common.speed_pair(ours, theirs))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "smolvlm_tower_fps_avx2.json"))
    ap.add_argument("--outtypes", nargs="+", default=["f32", "q8_0"])
    ap.add_argument("--reps", type=int, default=2, help="encodes per round and runtime")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    tree = llama_cpp_converter.fetch()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = vlm_refs.make_tiny_smolvlm(Path(tmp) / "smolvlm2-256m-tower", seed=0, vision_config=VISION_256M,
                                        text_config=TEXT_135M_WIDTH, scale_factor=4)
        pre = json.loads((hf / "preprocessor_config.json").read_text())
        pre["size"] = {"longest_edge": 512}  # llama.cpp then makes no tiles of a 512x512 frame
        (hf / "preprocessor_config.json").write_text(json.dumps(pre))
        pairs = llama_cpp_converter.convert_pair(hf, Path(tmp) / "gguf", tuple(args.outtypes), tree)
        img = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
        # float64 reference from the checkpoint's own tensors (tests/vlm_numpy.py, checked against transformers)
        x = ((img.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        cfg = json.loads((hf / "config.json").read_text())
        reference = vn.idefics3_vision_forward(vn.load_state_dict(hf), cfg["vision_config"], x, 4)[0]
        for outtype in args.outtypes:
            row = run(outtype, *pairs[outtype], img, args.reps, args.rounds, args.threads, reference)
            results.append(row)
            print(f"{outtype:5s} x2l-edge {row['x2l_edge_fps_best']:.3f} frames/s (best), mtmd "
                  f"{row['mtmd_fps_best']:.3f}; median ratio x2l/mtmd speed {row['speed_ratio_x2l_over_mtmd_median']:.2f}"
                  f"; rel rms vs float64: x2l-edge {row['rel_rms_x2l_vs_float64']:.1e}, mtmd "
                  f"{row['rel_rms_mtmd_vs_float64']:.1e}")
    bench_common.write_json(args.out, {
        "what": "frames/s of SmolVLM2-256M's vision tower (SigLIP-B/16 512 px + pixel shuffle 4 + projection, "
                "random weights) on one CPU frame: x2l-edge VisionEncoder.encode vs llama.cpp mtmd_encode_chunk, "
                "same mmproj.gguf, interleaved",
        "command": "python bench/smolvlm_tower_fps.py " + " ".join(sys.argv[1:]),
        "cpu": bench_common.cpu_name(), "isa": bench_common.isa_info(), "threads": args.threads,
        "llama_cpp_python": llama_cpp.__version__, "build": bench_common.build_info(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
