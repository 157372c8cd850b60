#!/usr/bin/env python3
"""Peer check: llama.cpp's own multimodal runtime (mtmd, via llama-cpp-python) on the model + mmproj pairs
its converter writes from the tiny VLM checkpoints, against the float64 NumPy towers of tests/vlm_numpy.py.

    python bench/vlm_llama_cpp_peer.py [--out bench/results/vlm_llama_cpp_peer.json]

For each family and outtype (f32, q8_0) one deterministic uint8 image (and, for Qwen, a pair of frames
merged in time, as llama.cpp's video path does) goes through mtmd_encode_chunk; the projector outputs are
compared with the reference computed from the same uint8 pixels. Agreement to ~1e-3 on f32 pins what
docs/families.md says about the files (tensor names, merge-window order, window size 112, frame pairing,
the pixel shuffle order): a wrong layout moves values by O(1). InternVL differs by ~3e-2: clip.cpp puts
the CLS token after the patches but adds the CLS-first position table in stored order, so every patch
gets its neighbour's position embedding (the defect llama.cpp issue #25814 reports for its llava graph);
a second InternVL row compares with a reference that emulates this shift. It measures accuracy only:
the tiny towers are far too small for a speed comparison.

Needs llama-cpp-python (not in the test extra: it builds from source for ~7-45 min) and the converter
(tools/llama_cpp_converter.py). Image sizes are chosen so that llama.cpp's preprocessing resizes nothing
(Qwen: multiples of 28 within 8..4096 merged tokens; Idefics3/SmolVLM/InternVL: the tower's own size, with
the processor's longest edge set to it so that llama.cpp makes no tiles), leaving the normalization and
the towers to compare. Differences then come from float32 vs float64 and from ggml's GELU (tanh
approximation in the merger/projector where HF uses erf). For Qwen2-VL / Qwen2.5-VL the same pixels also go
through x2l-edge's own tower (_core.QwenVision) on the same mmproj file, and for InternVL through
_core.VisionEncoder (x2l-edge follows HF's CLS-first position order).
"""
from __future__ import annotations

import argparse
import ctypes
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

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def mtmd_embeddings(model_path: Path, mmproj_path: Path, images: list[np.ndarray], n_embd: int,
                    mergeable: bool = False, n_threads: int = 2) -> list[np.ndarray]:
    """Projector outputs [n_tokens, n_embd] of every media chunk mtmd makes from `images` (uint8 HxWx3)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    params = M.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = n_threads
    params.print_timings = False
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), model, params)
    if not ctx:
        raise RuntimeError(f"mtmd could not load {mmproj_path}")
    bitmaps = []
    for im in images:
        data = np.ascontiguousarray(im, dtype=np.uint8)
        buf = (ctypes.c_uint8 * data.size).from_buffer_copy(data.tobytes())
        bm = M.mtmd_bitmap_init(data.shape[1], data.shape[0], buf)
        if mergeable:
            M.mtmd_bitmap_set_mergeable(bm, True)
        bitmaps.append(bm)
    marker = M.mtmd_default_marker()
    text = marker * len(images)
    it = M.mtmd_input_text(text=text, text_len=len(text), add_special=False, parse_special=True)
    chunks = M.mtmd_input_chunks_init()
    arr = (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
    if M.mtmd_tokenize(ctx, chunks, ctypes.byref(it), arr, len(bitmaps)) != 0:
        raise RuntimeError("mtmd_tokenize failed")
    out = []
    for i in range(M.mtmd_input_chunks_size(chunks)):
        chunk = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(chunk) == 0:  # text
            continue
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        if M.mtmd_encode_chunk(ctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        emb = M.mtmd_get_output_embd(ctx)
        out.append(np.ctypeslib.as_array(emb, shape=(n * n_embd,)).reshape(n, n_embd).copy())
    M.mtmd_input_chunks_free(chunks)
    for bm in bitmaps:
        M.mtmd_bitmap_free(bm)
    M.mtmd_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


def qwen_tower(mmproj_path):
    import x2l_edge._core as core

    return core.QwenVision.from_gguf(str(mmproj_path), n_threads=2)


def own_tower(mmproj_path):
    import x2l_edge._core as core

    return core.VisionEncoder.from_gguf(str(mmproj_path), n_threads=2)


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HxWx3 -> [3, H, W] float64, (x/255 - mean) / std."""
    return ((img.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    return {"tokens": int(ref.shape[0]), "max_abs_diff": float(np.abs(ref - got).max()),
            "max_abs_ref": float(np.abs(ref).max()),
            "rel_rms": float(np.sqrt(np.mean((ref - got) ** 2) / np.mean(ref ** 2)))}


def run_family(family: str, work: Path, tree: Path) -> dict:
    hf = vlm_refs.BUILDERS[family](work / family, seed=0)
    cfg = json.loads((hf / "config.json").read_text())
    info = vlm_refs.family_info(hf)
    if family in ("idefics3", "smolvlm"):
        # The processor's longest edge = the tower's size: llama.cpp then makes one tile (no resize).
        pre = json.loads((hf / "preprocessor_config.json").read_text())
        pre["size"] = {"longest_edge": info.image_size}
        (hf / "preprocessor_config.json").write_text(json.dumps(pre))
    sd = vn.load_state_dict(hf)
    result = {"family": family, "projector": None, "cases": []}
    for outtype in ("f32", "q8_0"):
        model_path, mmproj_path = llama_cpp_converter.convert_pair(hf, work / f"{family}-gguf", (outtype,), tree)[outtype]
        meta, _ = vlm_refs.read_gguf(mmproj_path, {"clip.projector_type"})
        result["projector"] = meta["clip.projector_type"]
        if family in ("qwen2vl", "qwen25vl"):
            a = (np.random.default_rng(1).random((168, 224, 3)) * 255).astype(np.uint8)
            b = (np.random.default_rng(2).random((168, 224, 3)) * 255).astype(np.uint8)
            cases = [("image 168x224", [a], False), ("frame pair 2x168x224", [a, b], True)]
            for name, imgs, pair in cases:
                frames = np.stack([normalize(im, vlm_refs.CLIP_MEAN, vlm_refs.CLIP_STD) for im in imgs])
                rows, grid = vn.qwen_patchify(frames)
                ref = vn.qwen_vision_forward(sd, cfg["vision_config"], rows, [grid])
                got = mtmd_embeddings(model_path, mmproj_path, imgs, 64, mergeable=pair)
                # x2l-edge's own tower (cpp/vision/qwen.h) on the same file and pixels
                ours = qwen_tower(mmproj_path).encode(np.ascontiguousarray(frames, dtype=np.float32))
                result["cases"].append(dict(outtype=outtype, case=name, chunks=len(got), **compare(ref, got[0]),
                                            x2l_edge=compare(ref, ours), x2l_edge_vs_mtmd=compare(got[0], ours)))
        else:
            side = info.image_size
            img = (np.random.default_rng(3).random((side, side, 3)) * 255).astype(np.uint8)
            if family == "internvl":
                x = normalize(img, IMAGENET_MEAN, IMAGENET_STD)[None]
                ref = vn.internvl_vision_forward(sd, cfg["vision_config"], x, cfg["downsample_ratio"])[0]
                # clip.cpp (0.3.36) appends the CLS token after the patches but adds the stored, CLS-first
                # position table in order: patch i gets row i instead of i + 1. Emulated here by rolling the
                # table so the reference can show that this is the whole difference.
                pos_name = "model.vision_tower.embeddings.position_embeddings"
                table = sd[pos_name].reshape(-1, sd[pos_name].shape[-1])
                shifted = dict(sd, **{pos_name: np.concatenate([table[-1:], table[:-1]])[None]})
                ref_shift = vn.internvl_vision_forward(shifted, cfg["vision_config"], x, cfg["downsample_ratio"])[0]
            else:
                x = normalize(img, [0.5] * 3, [0.5] * 3)[None]
                ref = vn.idefics3_vision_forward(sd, cfg["vision_config"], x, info.merge)[0]
            got = mtmd_embeddings(model_path, mmproj_path, [img], 64)
            # Idefics3: an overview chunk and one tile chunk of the same pixels; InternVL: one chunk.
            case = dict(outtype=outtype, case=f"image {side}x{side}", chunks=len(got),
                        **compare(ref, got[0][:ref.shape[0]]))
            if family == "internvl":  # x2l-edge's own tower (cpp/vision/vision.h) on the same file and pixels
                ours = own_tower(mmproj_path).encode(np.ascontiguousarray(x, dtype=np.float32))
                case.update(x2l_edge=compare(ref, ours), x2l_edge_vs_mtmd=compare(got[0], ours))
            result["cases"].append(case)
            if family == "internvl":
                result["cases"].append(dict(outtype=outtype, case="same, CLS-last positions", chunks=len(got),
                                            **compare(ref_shift, got[0])))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vlm_llama_cpp_peer.json"))
    ap.add_argument("--families", nargs="+", default=list(vlm_refs.BUILDERS))
    args = ap.parse_args()
    import llama_cpp

    tree = llama_cpp_converter.fetch()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_family(f, Path(tmp), tree) for f in args.families]
    for r in results:
        for c in r["cases"]:
            print(f"{r['family']:9s} {c['outtype']:5s} {c['case']:22s} chunks {c['chunks']}  max|d| "
                  f"{c['max_abs_diff']:.2e} of max|ref| {c['max_abs_ref']:.2f}  rel rms {c['rel_rms']:.1e}")
            if "x2l_edge" in c:
                print(f"{'':9s} {'':5s} {'  x2l-edge vs reference':22s}           max|d| {c['x2l_edge']['max_abs_diff']:.2e}"
                      f"  rel rms {c['x2l_edge']['rel_rms']:.1e};  vs mtmd rel rms {c['x2l_edge_vs_mtmd']['rel_rms']:.1e}")
    bench_common.write_json(args.out, {
        "what": "llama.cpp mtmd projector outputs vs tests/vlm_numpy.py on the tiny VLM pairs (accuracy only); "
                "Qwen and InternVL cases also x2l-edge's tower (x2l_edge: vs the reference, x2l_edge_vs_mtmd: vs mtmd)",
        "command": "python bench/vlm_llama_cpp_peer.py " + " ".join(sys.argv[1:]),
        "cpu": bench_common.cpu_name(), "isa": "AVX2 (llama-cpp-python built -march=native here)",
        "llama_cpp_python": llama_cpp.__version__, "converter": str(llama_cpp_converter.VERSION),
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
