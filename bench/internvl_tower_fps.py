#!/usr/bin/env python3
"""Frames per second through InternVL 2.5 / 3's vision tower on the CPU: x2l-edge next to llama.cpp's mtmd.

    python bench/internvl_tower_fps.py [--reps 1] [--rounds 3] [--threads 2] [--outtypes f32 q8_0] \\
        [--out bench/results/internvl_tower_fps_<isa>.json]

The tower has InternViT-300M-448px-V2_5's config (the tower of InternVL2.5-1B..4B and InternVL3-1B/2B:
width 1024, 24 blocks with layer scales, 16 heads, MLP 4096, 448 px / 14 -> 32x32 = 1024 patches + CLS),
pixel shuffle 2 -> 256 tokens, and the projector to InternVL3-1B's LLM width (896), with seeded random
weights (tests/vlm_refs.make_tiny_internvl with overrides; the values do not change the work) and a
one-layer Qwen2 LLM of that width (mtmd needs a model of the projector's width). llama.cpp's own converter
(tools/llama_cpp_converter.py) writes the model.gguf + mmproj.gguf pair; both runtimes read the same
mmproj file. One 448x448 frame per encode (video frames are one tile each); preprocessing is not timed.
x2l-edge: _core.VisionEncoder.encode on one normalised frame (kernels of the installed build, ISA recorded).
mtmd (llama-cpp-python 0.3.36, built -march=native on the same machine): mtmd_encode_chunk on the frame's image chunk (the checkpoint has no
min/max_dynamic_patch, so llama.cpp makes one 448x448 tile of it). The two are timed interleaved, `reps`
encodes each per round after a warm-up, best and median of the rounds reported, with their ratio; both
outputs are compared (relative RMS) with the float64 NumPy tower of tests/vlm_numpy.py on the checkpoint's
own tensors, and mtmd's also with that reference given llama.cpp 0.3.36's CLS-last position order
(docs/families.md §6), which is the layout its graph computes.
"""
from __future__ import annotations

import argparse
import json
import os
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

VISION_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=[448, 448], patch_size=[14, 14])
TEXT_1B_WIDTH = dict(hidden_size=896, num_hidden_layers=1, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
POS = "model.vision_tower.embeddings.position_embeddings"


def run(outtype: str, model_path: Path, mmproj_path: Path, img: np.ndarray, reps: int, rounds: int,
        n_threads: int, reference: np.ndarray, reference_cls_last: np.ndarray) -> dict:
    import x2l_edge._core as core

    from x2l_edge import internvl

    enc = core.VisionEncoder.from_gguf(str(mmproj_path), n_threads=n_threads)
    cfg = enc.config
    px = internvl.preprocess([img], cfg["image_size"], cfg["image_mean"], cfg["image_std"])  # 448x448: no resize
    mt = bench_common.Mtmd(model_path, mmproj_path, [img], n_threads)
    if len(mt.media_chunks) != 1:
        raise RuntimeError(f"mtmd made {len(mt.media_chunks)} image chunks of one 448x448 frame, not 1")
    ours_out, theirs_out = enc.encode(px), mt.encode()  # warm-up, and the outputs to compare
    if theirs_out.shape != ours_out.shape:
        raise RuntimeError(f"mtmd gave {theirs_out.shape}, x2l-edge {ours_out.shape}")
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(bench_common.timed(lambda: enc.encode(px), reps))
        theirs.append(bench_common.timed(mt.encode, reps))
    mt.close()
    rel_rms = bench_common.rel_rms
    row = {"outtype": outtype, "tokens_per_frame": int(ours_out.shape[0]),
           "rel_rms_x2l_vs_mtmd": rel_rms(ours_out, theirs_out),
           "rel_rms_x2l_vs_float64": rel_rms(ours_out, reference),
           "rel_rms_mtmd_vs_float64": rel_rms(theirs_out, reference),
           "rel_rms_mtmd_vs_float64_cls_last_positions": rel_rms(theirs_out, reference_cls_last)}
    row.update(bench_common.speed_pair(ours, theirs))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="default bench/results/internvl_tower_fps_<ISA of the x2l-edge build>.json")
    ap.add_argument("--outtypes", nargs="+", default=["f32", "q8_0"])
    ap.add_argument("--reps", type=int, default=1, help="encodes per round and runtime")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    isa = bench_common.isa_info()
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"internvl_tower_fps_{isa['build'].lower().replace('-', '')}.json")
    import llama_cpp

    tree = llama_cpp_converter.fetch()
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = vlm_refs.make_tiny_internvl(Path(tmp) / "internvit-300m", seed=0, vision_config=VISION_300M,
                                         text_config=TEXT_1B_WIDTH)
        pairs = llama_cpp_converter.convert_pair(hf, Path(tmp) / "gguf", tuple(args.outtypes), tree)
        img = (np.random.default_rng(0).random((448, 448, 3)) * 255).astype(np.uint8)
        # float64 references from the checkpoint's own tensors (tests/vlm_numpy.py, checked against transformers)
        x = ((img.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1)[None]
        cfg = json.loads((hf / "config.json").read_text())
        sd = vn.load_state_dict(hf)
        reference = vn.internvl_vision_forward(sd, cfg["vision_config"], x, cfg["downsample_ratio"])[0]
        table = sd[POS].reshape(-1, sd[POS].shape[-1])
        shifted = dict(sd, **{POS: np.concatenate([table[-1:], table[:-1]])[None]})
        reference_cls_last = vn.internvl_vision_forward(shifted, cfg["vision_config"], x, cfg["downsample_ratio"])[0]
        del sd, shifted
        for outtype in args.outtypes:
            row = run(outtype, *pairs[outtype], img, args.reps, args.rounds, args.threads, reference,
                      reference_cls_last)
            results.append(row)
            print(f"{outtype:5s} x2l-edge {row['x2l_edge_fps_best']:.3f} frames/s (best), mtmd "
                  f"{row['mtmd_fps_best']:.3f}; median ratio x2l/mtmd speed {row['speed_ratio_x2l_over_mtmd_median']:.2f}"
                  f"; rel rms vs float64: x2l-edge {row['rel_rms_x2l_vs_float64']:.1e}, mtmd "
                  f"{row['rel_rms_mtmd_vs_float64']:.1e} (CLS-last positions {row['rel_rms_mtmd_vs_float64_cls_last_positions']:.1e})")
    bench_common.write_json(args.out, {
        "what": "frames/s of InternViT-300M-448px (24 blocks, 1025 tokens) + pixel shuffle 2 + MLP projector to "
                "width 896, random weights, on one CPU frame: x2l-edge VisionEncoder.encode vs llama.cpp "
                "mtmd_encode_chunk, same mmproj.gguf, interleaved",
        "command": "python bench/internvl_tower_fps.py " + " ".join(sys.argv[1:]),
        "cpu": bench_common.cpu_name(), "isa": isa, "threads": args.threads,
        "mtmd_isa": "llama-cpp-python built with GGML_NATIVE (-march=native) on this machine",
        "load_average_1m_start_end": [load_start, os.getloadavg()[0]],
        "llama_cpp_python": llama_cpp.__version__, "build": bench_common.build_info(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
