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
import ctypes
import json
import statistics
import sys
import tempfile
import time
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


class Mtmd:
    """One mtmd context on a pair and the overview chunk of one image, encoded on demand."""

    def __init__(self, model_path: Path, mmproj_path: Path, img: np.ndarray, n_threads: int):
        import llama_cpp
        from llama_cpp import mtmd_cpp as M

        self.M, self.llama_cpp = M, llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                          llama_cpp.llama_model_default_params())
        params = M.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = n_threads
        params.print_timings = False
        self.ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError("llama.cpp could not load the pair")
        data = np.ascontiguousarray(img, dtype=np.uint8)
        self._buf = (ctypes.c_uint8 * data.size).from_buffer_copy(data.tobytes())
        self.bitmap = M.mtmd_bitmap_init(data.shape[1], data.shape[0], self._buf)
        marker = M.mtmd_default_marker()
        it = M.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        self.chunks = M.mtmd_input_chunks_init()
        arr = (M.mtmd_bitmap_p_ctypes * 1)(self.bitmap)
        if M.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(it), arr, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        images = [M.mtmd_input_chunks_get(self.chunks, i) for i in range(M.mtmd_input_chunks_size(self.chunks))]
        self.image_chunks = [c for c in images if M.mtmd_input_chunk_get_type(c) != 0]
        self.chunk = self.image_chunks[0]
        self.n_tokens = M.mtmd_input_chunk_get_n_tokens(self.chunk)

    def encode(self) -> np.ndarray:
        if self.M.mtmd_encode_chunk(self.ctx, self.chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        emb = self.M.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(emb, shape=(self.n_tokens * 576,)).reshape(self.n_tokens, 576).copy()

    def close(self):
        M = self.M
        M.mtmd_input_chunks_free(self.chunks)
        M.mtmd_bitmap_free(self.bitmap)
        M.mtmd_free(self.ctx)
        self.llama_cpp.llama_model_free(self.model)


def rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run(outtype: str, model_path: Path, mmproj_path: Path, img: np.ndarray, reps: int, rounds: int,
        n_threads: int, reference: np.ndarray) -> dict:
    import x2l_edge._core as core

    from x2l_edge import smolvlm

    enc = core.VisionEncoder.from_gguf(str(mmproj_path), n_threads=n_threads)
    cfg = enc.config
    px = smolvlm.preprocess([img], cfg["image_size"], cfg["image_mean"], cfg["image_std"])  # 512x512: no resize
    mt = Mtmd(model_path, mmproj_path, img, n_threads)
    ours_out, theirs_all = enc.encode(px), mt.encode()  # warm-up, and the outputs to compare
    # mtmd's idefics3 preprocessing gives the overview and one tile of the same 512x512 pixels in one
    # chunk: one encode runs the tower on each, so its time per frame is the chunk's over that count.
    per_chunk = theirs_all.shape[0] // ours_out.shape[0]
    theirs_out = theirs_all[:ours_out.shape[0]]
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(timed(lambda: enc.encode(px), reps))
        theirs.append(timed(mt.encode, reps) / per_chunk)
    mt.close()
    rel = float(np.sqrt(np.mean((ours_out - theirs_out) ** 2) / np.mean(theirs_out ** 2)))
    row = {"outtype": outtype, "tokens_per_frame": int(ours_out.shape[0]), "mtmd_chunk_tokens": int(theirs_all.shape[0]),
           "mtmd_tower_runs_per_encode": int(per_chunk), "rel_rms_x2l_vs_mtmd": rel,
           "rel_rms_x2l_vs_float64": rel_rms(ours_out, reference),
           "rel_rms_mtmd_vs_float64": rel_rms(theirs_out, reference),
           "x2l_edge_s_per_frame": {"best": min(ours), "median": statistics.median(ours), "rounds": ours},
           "mtmd_s_per_frame": {"best": min(theirs), "median": statistics.median(theirs), "rounds": theirs}}
    row["x2l_edge_fps_best"] = 1.0 / row["x2l_edge_s_per_frame"]["best"]
    row["mtmd_fps_best"] = 1.0 / row["mtmd_s_per_frame"]["best"]
    row["speed_ratio_x2l_over_mtmd_median"] = statistics.median(theirs) / statistics.median(ours)
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
