#!/usr/bin/env python3
"""Frames per second through Qwen2-VL's and Qwen2.5-VL's vision towers on the CPU: x2l-edge next to llama.cpp's mtmd.

    python bench/qwen_tower_fps.py [--families qwen2vl qwen25vl] [--depth 32] [--side 448] [--reps 1] \\
        [--rounds 3] [--threads 2] [--outtypes f32 q8_0] [--out bench/results/qwen_tower_fps_<isa>.json]

The towers have the released vision configs with seeded random weights (tests/vlm_refs.make_tiny_qwen2vl /
make_tiny_qwen25vl with overrides; the values do not change the work): Qwen2-VL-2B's (ViT width 1280, 16
heads, LayerNorm + quick-GELU MLP 5120, merger to the LLM width 1536) and Qwen2.5-VL-3B's (width 1280, 16
heads, RMSNorm + SwiGLU 3420, 112 px windows with full attention in every 8th block, merger to 2048), patch
14, temporal patch 2, merge 2. `--depth` sets the number of blocks of both towers (the released 32 by
default; fewer blocks do proportionally less work in both runtimes, and Qwen2.5's every-8th-block full
attention is kept, so depth must be a multiple of 8). A one-layer Qwen2 LLM of the released width is
attached (mtmd needs a model of the projector's width). llama.cpp's own converter
(tools/llama_cpp_converter.py) writes the model.gguf + mmproj.gguf pair; both runtimes read the same mmproj.

One encode = one temporal pair: two side x side frames (448: 32x32 patches = 1024 ViT tokens -> 256 merged
tokens), the unit both runtimes encode for video. x2l-edge: _core.QwenVision.encode on the two normalised
frames (kernels of the installed build, ISA recorded). mtmd (llama-cpp-python 0.3.36, built -march=native
on the same machine): mtmd_encode_chunk on the one chunk it makes of the two frames as mergeable bitmaps
(its video path); its preprocessing happens in mtmd_tokenize and is not timed, and the sizes are
multiples of 28 so neither runtime resizes. The two are timed interleaved, `reps` encodes each per round
after a warm-up; best and median seconds per frame (encode / 2) of the rounds, with the ratio of the
medians. Both outputs are compared (relative RMS) with each other and with the float64 NumPy tower of
tests/vlm_numpy.py on the checkpoint's own tensors (`--no-reference` skips it).
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

MROPE_128 = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}  # head_dim 128
FAMILIES = {
    # name: (checkpoint builder, vision config without depth, one-layer LLM of the released width, label)
    "qwen2vl": (vlm_refs.make_tiny_qwen2vl,
                dict(embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
                dict(hidden_size=1536, num_hidden_layers=1, num_attention_heads=12, num_key_value_heads=2,
                     intermediate_size=8960, rope_parameters=MROPE_128),
                "Qwen2-VL-2B tower"),
    "qwen25vl": (vlm_refs.make_tiny_qwen25vl,
                 dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112),
                 dict(hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=2,
                      intermediate_size=11008, rope_parameters=MROPE_128),
                 "Qwen2.5-VL-3B tower"),
}
FULL_ATTENTION_EVERY = 8  # Qwen2.5-VL-3B/7B: fullatt_block_indexes 7, 15, 23, 31


def vision_config(family: str, depth: int) -> dict:
    cfg = dict(FAMILIES[family][1], depth=depth)
    if family == "qwen25vl":
        if depth % FULL_ATTENTION_EVERY:
            raise ValueError(f"--depth {depth}: Qwen2.5-VL's full-attention pattern needs a multiple of 8 blocks")
        cfg["fullatt_block_indexes"] = list(range(FULL_ATTENTION_EVERY - 1, depth, FULL_ATTENTION_EVERY))
    return cfg


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HxWx3 -> [3, H, W] float64, (x/255 - mean) / std (the Qwen processors' rescale + normalize)."""
    return ((img.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def run(outtype: str, model_path: Path, mmproj_path: Path, frames_u8: list, reps: int, rounds: int,
        n_threads: int, reference) -> dict:
    import x2l_edge._core as core

    tower = core.QwenVision.from_gguf(str(mmproj_path), n_threads=n_threads)
    cfg = tower.config
    frames = np.stack([normalize(f, cfg["image_mean"], cfg["image_std"]) for f in frames_u8]).astype(np.float32)
    mt = bench_common.Mtmd(model_path, mmproj_path, frames_u8, n_threads, mergeable=True)
    try:
        if len(mt.media_chunks) != 1:
            raise RuntimeError(f"mtmd made {len(mt.media_chunks)} chunks of a frame pair, not 1")
        ours_out, theirs_out = tower.encode(frames), mt.encode()  # warm-up, and the outputs to compare
        if theirs_out.shape != ours_out.shape:
            raise RuntimeError(f"mtmd gave {theirs_out.shape}, x2l-edge {ours_out.shape}")
        per_encode = len(frames_u8)
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(bench_common.timed(lambda: tower.encode(frames), reps) / per_encode)
            theirs.append(bench_common.timed(mt.encode, reps) / per_encode)
    finally:
        mt.close()
    row = {"outtype": outtype, "frames_per_encode": per_encode, "tokens_per_encode": int(ours_out.shape[0]),
           "rel_rms_x2l_vs_mtmd": bench_common.rel_rms(ours_out, theirs_out)}
    if reference is not None:
        row["rel_rms_x2l_vs_float64"] = bench_common.rel_rms(ours_out, reference)
        row["rel_rms_mtmd_vs_float64"] = bench_common.rel_rms(theirs_out, reference)
    row.update(bench_common.speed_pair(ours, theirs))
    return row


def markdown(doc: dict) -> str:
    lines = [f"# {doc['what']}", "", f"`{doc['command']}`", "",
             f"CPU {doc['cpu']}; x2l-edge kernels **{doc['isa']['build']}** (machine {doc['isa']['machine']}); "
             f"mtmd: {doc['mtmd_isa']}; {doc['threads']} threads; tower depth {doc['depth']} of 32; "
             f"{doc['side']}x{doc['side']} frame pairs; load average (1 min) {doc['load_average_1m_start_end'][0]:.1f} "
             f"at start, {doc['load_average_1m_start_end'][1]:.1f} at end.", "",
             "| tower | file | x2l-edge s/frame (best, median) | mtmd s/frame (best, median) | speed x2l-edge / mtmd "
             "(median) | rel RMS x2l-edge vs mtmd | rel RMS vs float64: x2l-edge, mtmd |",
             "|---|---|---|---|---|---|---|"]
    for fam in doc["results"]:
        for r in fam["rows"]:
            ref = (f"{r['rel_rms_x2l_vs_float64']:.1e}, {r['rel_rms_mtmd_vs_float64']:.1e}"
                   if "rel_rms_x2l_vs_float64" in r else "not computed")
            lines.append(f"| {fam['tower']} | {r['outtype']} | {r['x2l_edge_s_per_frame']['best']:.2f}, "
                         f"{r['x2l_edge_s_per_frame']['median']:.2f} | {r['mtmd_s_per_frame']['best']:.2f}, "
                         f"{r['mtmd_s_per_frame']['median']:.2f} | {r['speed_ratio_x2l_over_mtmd_median']:.2f} | "
                         f"{r['rel_rms_x2l_vs_mtmd']:.1e} | {ref} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="default bench/results/qwen_tower_fps_<ISA of the x2l-edge build>.json")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--outtypes", nargs="+", default=["f32", "q8_0"])
    ap.add_argument("--depth", type=int, default=32, help="ViT blocks of both towers (released: 32)")
    ap.add_argument("--side", type=int, default=448, help="frame side in pixels (a multiple of 28)")
    ap.add_argument("--reps", type=int, default=1, help="encodes per round and runtime")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 NumPy tower")
    args = ap.parse_args()
    if args.side % 28:
        ap.error("--side must be a multiple of 28 (patch 14 x merge 2), so that neither runtime resizes")
    for family in args.families:
        try:
            vision_config(family, args.depth)
        except ValueError as e:
            ap.error(str(e))
    isa = bench_common.isa_info()
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"qwen_tower_fps_{isa['build'].lower().replace('-', '')}.json")
    import llama_cpp

    tree = llama_cpp_converter.fetch()
    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    frames_u8 = [(rng.random((args.side, args.side, 3)) * 255).astype(np.uint8) for _ in range(2)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            build, _, text, label = FAMILIES[family]
            hf = build(Path(tmp) / family, seed=0, vision_config=vision_config(family, args.depth), text_config=text)
            pairs = llama_cpp_converter.convert_pair(hf, Path(tmp) / f"{family}-gguf", tuple(args.outtypes), tree)
            reference = None
            if not args.no_reference:  # float64 tower on the checkpoint's own tensors (checked against transformers)
                cfg = json.loads((hf / "config.json").read_text())
                rows, grid = vn.qwen_patchify(np.stack([normalize(f, vlm_refs.CLIP_MEAN, vlm_refs.CLIP_STD)
                                                        for f in frames_u8]))
                reference = vn.qwen_vision_forward(vn.load_state_dict(hf), cfg["vision_config"], rows, [grid])
            rows_out = []
            for outtype in args.outtypes:
                row = run(outtype, *pairs[outtype], frames_u8, args.reps, args.rounds, args.threads, reference)
                rows_out.append(row)
                ref = (f"; rel rms vs float64: x2l-edge {row['rel_rms_x2l_vs_float64']:.1e}, mtmd "
                       f"{row['rel_rms_mtmd_vs_float64']:.1e}" if reference is not None else "")
                print(f"{family:8s} {outtype:5s} x2l-edge {row['x2l_edge_fps_best']:.3f} frames/s (best), mtmd "
                      f"{row['mtmd_fps_best']:.3f}; median ratio x2l/mtmd speed "
                      f"{row['speed_ratio_x2l_over_mtmd_median']:.2f}; x2l vs mtmd {row['rel_rms_x2l_vs_mtmd']:.1e}{ref}",
                      flush=True)
            results.append({"family": family, "tower": label, "vision_config": vision_config(family, args.depth),
                            "llm_width": text["hidden_size"], "rows": rows_out})
    doc = {
        "what": "frames/s of Qwen2-VL-2B's and Qwen2.5-VL-3B's vision towers (random weights, "
                f"{args.depth} of the released 32 blocks) on one CPU temporal pair of two {args.side}x{args.side} "
                "frames: x2l-edge QwenVision.encode vs llama.cpp mtmd_encode_chunk, same mmproj.gguf, interleaved",
        "command": "python bench/qwen_tower_fps.py " + " ".join(sys.argv[1:]),
        "cpu": bench_common.cpu_name(), "isa": isa, "threads": args.threads, "depth": args.depth,
        "released_depth": 32, "side": args.side,
        "mtmd_isa": "llama-cpp-python built with GGML_NATIVE (-march=native) on this machine",
        "load_average_1m_start_end": [load_start[0], os.getloadavg()[0]],
        "load_average_1_5_15_start": list(load_start),
        "llama_cpp_python": llama_cpp.__version__, "build": bench_common.build_info(), "results": results}
    bench_common.write_json(args.out, doc)
    md = Path(args.out).with_suffix(".md")
    md.write_text(markdown(doc))
    print("wrote", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
