"""CUDA backend, issue 20's families: the new kernels (multi-axis rotary for M-RoPE, Idefics3's pixel shuffle)
against numpy references written from the spec, the SmolVLM2 / Idefics3 tower and the Qwen2-VL / Qwen2.5-VL
LLM (M-RoPE) on the device against the CPU backend, on the llama.cpp-converted tiny random pairs of
tests/test_smolvlm.py / tests/test_qwen2vl.py (the `vlm_llama_cpp` fixture).

The device tests skip without a CUDA device (and fail when one is expected, as in tests/test_cuda.py).
`python tests/cuda_emu/run.py` runs this file against the CPU emulator of CUDA: that is not a GPU run,
and nothing here has run on a GPU unless bench/gpu/check.sh was run on one.

Tolerances: the device multiplies f16 operands on tensor cores for 64+ rows and keeps an f16 KV cache, the
CPU reference runs f32 weights (same f16 cache for the LLM): tower outputs within 3e-3 of their largest
value (as tests/test_cuda.py's SigLIP/CLIP towers), logits within 1e-2 of their spread; a wrong axis,
section or shuffle order moves them by O(1). X²L with ratio 1 keeps every entry, so on the same device it
reproduces the device's own full-KV forward up to the order of float sums (2e-3 of the spread).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import vlm_numpy as vn
from probes import needs_probes
from probes import testing as _testing
from test_cuda import _max_rel, _need_gpu, _rel_err  # noqa: F401  (_need_gpu: the fixture behind `gpu`)
from test_internvl import six_b  # noqa: F401  (the InternViT-6B layout's tiny mmproj)
from x2l_edge import _core

gpu = pytest.mark.usefixtures("_need_gpu")
QWEN = ("qwen2vl", "qwen25vl")
IDEFICS = ("smolvlm", "idefics3")
Q = "What happens?"


# ----------------------------------------------------------------------------- kernels vs numpy


@needs_probes
@gpu
@pytest.mark.parametrize("in_place", [False, True])
def test_cuda_rope_axes_matches_numpy(in_place):
    """M-RoPE (3 axes, Qwen2-VL's sections [2, 3, 3] of 8 pairs) and the ViT's 2-D rotary (row / column
    halves) against rope_neox at the float64 angle pos * float32(freq): within 2e-5 of the largest value at
    positions up to 30000 (the kernel's FP32 reduction is accurate to ~1e-6 rad there). one_row: every axis
    reads row 0, the same as three equal rows (a text token's position)."""
    rng = np.random.default_rng(1)
    T, H, D = 7, 3, 16
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    sections = (2, 3, 3)
    axis = np.repeat(np.arange(3), sections).astype(np.uint8)
    freq = vn.rope_inv_freq(D, 1e6).astype(np.float32)
    pos = rng.integers(0, 30000, (3, T)).astype(np.int32)
    want = vn.rope_neox(x.astype(np.float64), pos[axis].T.astype(np.float64) * freq.astype(np.float64))
    got = _testing.cuda_rope_axes(x, pos, freq, axis, in_place=in_place)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    same = np.repeat(pos[:1], 3, axis=0)
    np.testing.assert_array_equal(_testing.cuda_rope_axes(x, pos, freq, axis, one_row=True),
                                  _testing.cuda_rope_axes(x, same, freq, axis))
    # the ViT: pairs j < D/4 by the row, D/4 + j by the column, frequency theta^(-2j / (D/2))
    q = D // 4
    vfreq = np.tile(vn.rope_inv_freq(D // 2, 10000.0), 2).astype(np.float32)
    vaxis = np.repeat(np.arange(2), q).astype(np.uint8)
    rc = rng.integers(0, 64, (2, T)).astype(np.int32)
    want = vn.rope_neox(x.astype(np.float64), rc[vaxis].T.astype(np.float64) * vfreq.astype(np.float64))
    np.testing.assert_allclose(_testing.cuda_rope_axes(x, rc, vfreq, vaxis, in_place=in_place), want, rtol=0,
                               atol=2e-5 * np.abs(want).max())
    with pytest.raises(RuntimeError, match="axis"):
        _testing.cuda_rope_axes(x, pos[:2], freq, axis)  # axis 2 of 2 position rows


@needs_probes
@gpu
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_cuda_pixel_shuffle_matches_numpy(scale):
    """Idefics3's space-to-depth on 3 frames of an 8x8 grid: exactly vn.pixel_shuffle (a pure regrouping)."""
    x = np.random.default_rng(scale).standard_normal((3, 8, 8, 5)).astype(np.float32)
    want = vn.pixel_shuffle(x.reshape(3, 64, 5), scale)
    np.testing.assert_array_equal(_testing.cuda_pixel_shuffle(x, scale), want)
    with pytest.raises(RuntimeError, match="divide"):
        _testing.cuda_pixel_shuffle(x, 3)


# ----------------------------------------------------------------------------- SmolVLM2 / Idefics3 tower


def _frames(n, size, seed):
    return (1.5 * np.random.default_rng(seed).standard_normal((n, 3, size, size))).astype(np.float32)


@gpu
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("family", IDEFICS + ("internvl",))
def test_cuda_shuffle_vision_matches_cpu(vlm_llama_cpp, tmp_path, family, outtype):
    """llama.cpp's idefics3 mmproj (SigLIP blocks, post-LN, pixel shuffle, bias-free fc) and internvl mmproj
    (InternViT: CLS, layer scales; CLS dropped, pixel shuffle, LayerNorm + MLP) on the device against the CPU
    tower at every stage, 3 frames in batches of 2 (an uneven last batch). q8_0: the reference is the CPU on
    the same weights dequantized to f32 (the CPU multiplies q8_0 weights with q8 activations)."""
    mmproj = str(vlm_llama_cpp(outtype)[family][1])
    ref_path = mmproj
    if outtype == "q8_0":
        from requantize import requantize

        ref_path = str(tmp_path / "dequantized.gguf")
        requantize(mmproj, ref_path, "f32", progress=False)
    cpu = _core.VisionEncoder.from_gguf(ref_path, n_threads=2)
    dev = _core.VisionEncoder.from_gguf(mmproj, n_threads=2, device=0)
    assert (cpu.device, dev.device) == ("cpu", "cuda:0")
    assert dev.config["projector"] in ("pixel_shuffle", "shuffle_mlp") and dev.device_bytes >= dev.weight_bytes > 0
    dev.batch_frames = 2
    px = _frames(3, cpu.config["image_size"], seed=4)
    for stage in ("hidden_states", "projected", "encode"):
        a, b = getattr(cpu, stage)(px), getattr(dev, stage)(px)
        assert np.isfinite(b).all(), stage
        assert _max_rel(b, a) < 3e-3, (stage, _max_rel(b, a))
    assert dev.encode(px).shape == (3 * dev.tokens_per_frame, dev.n_embd)


@gpu
def test_cuda_internvit_6b_vision_matches_cpu(six_b):
    """InternViT-6B's block layout (RMSNorm blocks, q/k RMSNorm over the width, no q/k/v biases; the tiny
    checkpoint of tests/test_internvl.py converted by llama.cpp) on the device against the CPU tower."""
    _, mmproj = six_b
    cpu = _core.VisionEncoder.from_gguf(str(mmproj), n_threads=2)
    dev = _core.VisionEncoder.from_gguf(str(mmproj), n_threads=2, device=0)
    assert (dev.config["rms_norm"], dev.config["qk_norm"], dev.config["layer_scale"]) == (True, True, True)
    px = _frames(2, cpu.config["image_size"], seed=8)
    for stage in ("hidden_states", "encode"):
        a, b = getattr(cpu, stage)(px), getattr(dev, stage)(px)
        assert np.isfinite(b).all() and _max_rel(b, a) < 3e-3, (stage, _max_rel(b, a))


@gpu
def test_cuda_smolvlm_session_answers_like_cpu(vlm_llama_cpp):
    """Session(model, mmproj=..., device='cuda:0') on a SmolVLM2 pair: the tower and the LLM on the device
    (no fallback warning). Every row's logits of the timestamped video prompt (head text, frame rows, question)
    match a CPU session's (f16 KV on both), ask() in full mode builds the same prompt and answers with the
    argmax of the device's last prompt row, and an X²L index with ratio 1 is prefilled and decoded on the
    device with the full-KV logits of the same prompt."""
    import x2l_edge
    from test_smolvlm import _prompt_pieces
    from x2l_edge import smolvlm

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["smolvlm"])
    kw = dict(mmproj=mmproj, n_threads=2, n_ctx=1024, n_batch=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dev = x2l_edge.Session(model, device="cuda:0", **kw)
        assert dev.device == "cuda:0" and dev.vision.device == "cuda:0"
    cpu = x2l_edge.Session(model, device="cpu", **kw)
    video = (np.random.default_rng(5).random((4, 90, 160, 3)) * 255).astype(np.uint8)
    stamps = [0.0, 1.0, 2.0, 3.0]
    logits = {}
    for name, s in (("cpu", cpu), ("dev", dev)):
        head, embd, tail, _ = _prompt_pieces(s, smolvlm.SmolMedia(s), video, stamps, 3.0)
        s.reset()
        logits[name] = np.concatenate([s.eval(head, all_logits=True), s._s.eval_embd(embd, all_logits=True),
                                       s.eval(tail, all_logits=True)])
        logits[name + "_embd"] = embd
    assert _max_rel(logits["dev_embd"], logits["cpu_embd"]) < 3e-3  # the tower ran on the device
    a, b = logits["cpu"], logits["dev"]
    assert np.isfinite(b).all() and _rel_err(b, a) < 1e-2, _rel_err(b, a)
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        answer = dev.ask(video, Q, mode="full", max_tokens=3)
        run = list(dev._s.history)
        prompt = head + [-1] * len(embd) + tail  # media rows (frame text and image rows) show as -1
        assert isinstance(answer, str) and run[:len(prompt)] == prompt and run[len(prompt)] == int(b[-1].argmax())
        ctx = dev.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, high_type="f16")
        assert ctx.n_chunks == 2 and ctx._dec.on_device
        ours = ctx.logits(Q, range(2))
    n_q = len(ctx.question_ids(Q))
    assert ctx.question_ids(Q) == tail
    assert _rel_err(ours, b[-n_q:]) < 2e-3, _rel_err(ours, b[-n_q:])


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL tower


@gpu
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("family", QWEN)
def test_cuda_qwen_vision_matches_cpu(vlm_llama_cpp, tmp_path, family, outtype):
    """llama.cpp's Qwen mmproj on the device (Conv3D as two 2-D kernels, 2-D rotary, Qwen2.5's windows and
    full-attention blocks, LayerNorm + quick_gelu / RMSNorm + SwiGLU, the 2x2 merger) against the CPU tower:
    3 frames of 140x196 (two temporal pairs, the last frame repeated; a 5x7 merged grid in 4x4-cell windows:
    four windows of 64, 48, 16 and 12 tokens), then a smaller 56x84 image (the layout changes, the buffers
    stay). q8_0: the reference is the CPU on the weights dequantized to f32."""
    mmproj = str(vlm_llama_cpp(outtype)[family][1])
    ref_path = mmproj
    if outtype == "q8_0":
        from requantize import requantize

        ref_path = str(tmp_path / "dequantized.gguf")
        requantize(mmproj, ref_path, "f32", progress=False)
    cpu = _core.QwenVision.from_gguf(ref_path, n_threads=2)
    dev = _core.QwenVision.from_gguf(mmproj, n_threads=2, device=0)
    assert (cpu.device, dev.device) == ("cpu", "cuda:0") and dev.device_bytes >= dev.weight_bytes > 0
    rng = np.random.default_rng(7)
    for n, h, w in ((3, 140, 196), (1, 56, 84)):
        px = (1.5 * rng.standard_normal((n, 3, h, w))).astype(np.float32)
        a, b = cpu.encode(px), dev.encode(px)
        assert b.shape == a.shape == (((n + 1) // 2) * (h // 28) * (w // 28), cpu.config["n_embd"])
        assert np.isfinite(b).all() and _max_rel(b, a) < 3e-3, (n, h, w, _max_rel(b, a))
    with pytest.raises(_core.Error, match="multiple of 28"):
        dev.encode(np.zeros((2, 3, 30, 56), np.float32))


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL LLM (M-RoPE)


def _qwen_video(seed, n=4, h=56, w=84):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


def _qwen_prompt_logits(s, media, embd, grid, pre, post):
    """Every row's logits of text, a video's rows at their (t, h, w) positions, text after (the pieces ask() uses)."""
    a = s.eval(pre, all_logits=True)
    b = s._s.eval_media(embd, *grid, video=True, merge=2, seconds_per_grid=1.0,
                        tokens_per_second=media.tokens_per_second, text_after="max", all_logits=True)
    c = s.eval(post, all_logits=True)
    return np.concatenate([a, b, c])


@gpu
@pytest.mark.parametrize("family", QWEN)
def test_cuda_llm_matches_cpu_qwen_mrope(vlm_llama_cpp, family):
    """A llama.cpp Qwen pair on the device (tower and M-RoPE LLM): the video's tokens, then the LLM fed the
    same tokens on both: a text + video + text prompt in batches of 5 (pieces of the [3, n] positions;
    Qwen2.5's time-scaled t axis), then greedy decode steps (one replayed CUDA graph: a text token's one
    position on every axis), against the CPU backend with the same f16 KV cache."""
    import x2l_edge
    from x2l_edge import qwen_vl

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")[family])
    kw = dict(mmproj=mmproj, n_threads=2, n_ctx=512, n_batch=5)
    cpu = x2l_edge.Session(model, device="cpu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dev = x2l_edge.Session(model, device="cuda:0", **kw)
    assert dev.device == "cuda:0" and dev._s.info()["backend"] == "cuda" and dev.vision.device == "cuda:0"
    media = qwen_vl.QwenMedia(cpu)
    px = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)
    embd, grid = media.encode(list(_qwen_video(22)), video=True, **px)
    dev_embd, dev_grid = qwen_vl.QwenMedia(dev).encode(list(_qwen_video(22)), video=True, **px)
    assert dev_grid == grid and _max_rel(dev_embd, embd) < 3e-3  # the device tower
    assert grid[0] == 2 and len(embd) > 5  # two temporal pairs, more rows than a batch
    before, after = qwen_vl.prompt_parts(cpu, Q, "video")
    pre, post = cpu.tokenize(before), cpu.tokenize(after)
    a = _qwen_prompt_logits(cpu, media, embd, grid, pre, post)
    b = _qwen_prompt_logits(dev, qwen_vl.QwenMedia(dev), embd, grid, pre, post)
    assert np.isfinite(b).all()
    assert _rel_err(b, a) < 1e-2, _rel_err(b, a)
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
    graphs = dev._s.graph_stats()["replays"]
    for step in range(3):
        t = int(a[-1].argmax()) if step == 0 else int(la.argmax())
        cpu.eval([t])
        dev.eval([t])
        la, lb = np.asarray(cpu._s.logits()), np.asarray(dev._s.logits())
        assert _rel_err(lb, la) < 1e-2, step
    assert dev._s.graph_stats()["replays"] > graphs  # the decode steps replayed the graph


@gpu
@pytest.mark.parametrize("family", QWEN)
def test_cuda_qwen_x2l_uncompressed_equals_full(vlm_llama_cpp, family):
    """X²L on a Qwen video on the device (the bi-level prefill and the mixed cache keep every entry's
    (t, h, w) position): 8 frames in chunks of 2, ratio 1 on both tiers; the mixed cache with every chunk
    reloaded, or none, gives the device's own full-KV logits of the same prompt (2e-3 of their spread), and
    those match the CPU backend's X²L logits (1e-2). No fallback to the CPU."""
    import x2l_edge
    from x2l_edge import qwen_vl

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")[family])
    kw = dict(mmproj=mmproj, n_threads=2, n_ctx=1024)
    video = _qwen_video(31, n=8)
    px = dict(min_pixels=28 * 28 * 6, max_pixels=28 * 28 * 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dev = x2l_edge.Session(model, device="cuda:0", **kw)
        ctx = dev.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, high_type="f16", **px)
        assert ctx.n_chunks == 4 and ctx._dec.on_device
        ours_all = ctx.logits(Q, range(4))
        ours_none = ctx.logits(Q, [])
    media = qwen_vl.QwenMedia(dev)
    embd, grid = media.encode(list(video), video=True, **px)
    before, _ = qwen_vl.prompt_parts(dev, Q, "video")
    dev.reset()
    dev._s.eval(dev.tokenize(before))
    media.append(embd, grid, video=True, fps=2.0)
    ref = dev.eval(ctx.question_ids(Q), all_logits=True)
    assert _rel_err(ours_all, ref) < 2e-3, _rel_err(ours_all, ref)
    assert _rel_err(ours_none, ref) < 2e-3, _rel_err(ours_none, ref)
    cpu = x2l_edge.Session(model, device="cpu", **kw)
    cpu_all = cpu.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, high_type="f16", **px).logits(Q, range(4))
    assert _rel_err(ours_all, cpu_all) < 1e-2
    # a compressed index: a scorer selects, the chosen chunk is reloaded on the device and an answer comes out
    ctx2 = dev.prefill(video, chunk_frames=2, ratio_low=2, ratio_high=8, **px)
    for scorer in ("attention", "keys"):
        assert len(ctx2.select(question=Q, scorer=scorer, top_k=1)) == 1
    assert isinstance(ctx2.ask(Q, chunks=[3], max_tokens=3), str) and ctx2.reload_stats()["n_chunks"] == 1
