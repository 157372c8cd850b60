"""SmolVLM2 / Idefics3 through the runtime, on llama.cpp's own two-file GGUFs of the tiny checkpoints
(tests/vlm_refs.py: make_tiny_smolvlm is SmolVLM2's layout, 128 px / 16 -> 8x8 patches, pixel shuffle 4
-> 4 tokens per frame; make_tiny_idefics3 64 px, shuffle 2 -> 4 tokens; both a llama LLM of width 64),
converted by tools/llama_cpp_converter.py, against transformers.

Tolerances: the runtime computes in float32 with an f32 KV cache (kv_type="f32") on f32 weights,
transformers in float32; tower outputs reach ~5 and logits ~8, so atol = rtol = 1e-3 is a wide margin
while a missing post-LayerNorm, a transposed shuffle or a misplaced frame moves them by > 0.1. q8_0
mmproj: the 2-D weights themselves are rounded, so the bound is a relative RMS error. X²L with ratio 1 on
both tiers keeps every entry, so it must reproduce full KV to float32 rounding (atol = rtol = 1e-4).
Preprocessing is Pillow-exact (uint8 equality), so the normalised pixels match transformers' processor
to float32 rounding (atol 1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest

import vlm_numpy as vn
import vlm_refs

IDEFICS = ("smolvlm", "idefics3")
TOL = dict(rtol=1e-3, atol=1e-3)
Q = "What happens?"


@pytest.fixture(scope="module")
def hf_models(vlm_hf):
    return {fam: vlm_refs.load_model(vlm_hf[fam]) for fam in IDEFICS}


def _session(vlm_llama_cpp, family, outtype="f32", **kw):
    import x2l_edge

    model, mmproj = vlm_llama_cpp(outtype)[family]
    kw = {"device": "cpu", "kv_type": "f32", "n_threads": 2, **kw}
    return x2l_edge.Session(str(model), mmproj=str(mmproj), **kw)


def _video_u8(seed, n, h, w):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


def _hf_ids(path, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _processor(side):
    """transformers' SmolVLM image processor (Pillow backend) set up as SmolVLM2 treats a video frame:
    no tiling, longest edge then square side x side, LANCZOS, mean = std = 0.5."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": side},
                                    max_image_size={"longest_edge": side}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, resample=1)  # 1 = PILImageResampling.LANCZOS


def _hf_pixels(side, frames):
    out = _processor(side)(images=[list(frames)], return_tensors="np")
    return out["pixel_values"][0]  # [F, 3, side, side]


# ----------------------------------------------------------------------------- the tower


@pytest.mark.parametrize("family", IDEFICS)
def test_tower_matches_transformers(vlm_llama_cpp, vlm_hf, hf_models, family):
    """The runtime's SigLIP tower + pixel shuffle + projection on llama.cpp's mmproj.gguf vs transformers'
    get_image_features (and the post-LayerNorm features vs its vision_model), 3 frames, f32."""
    import torch

    import x2l_edge._core as core

    info = vlm_refs.family_info(vlm_hf[family])
    _, mmproj = vlm_llama_cpp("f32")[family]
    enc = core.VisionEncoder.from_gguf(str(mmproj), n_threads=2)
    cfg = enc.config
    assert (cfg["projector"], cfg["scale_factor"], cfg["post_norm"]) == ("pixel_shuffle", info.merge, True)
    assert cfg["image_size"] == info.image_size and cfg["tokens_per_frame"] == 4 and enc.n_embd == 64
    side = info.image_size
    frames = np.random.default_rng(3).standard_normal((3, 3, side, side)).astype(np.float32)
    model = hf_models[family].model
    with torch.no_grad():
        ref = model.get_image_features(torch.from_numpy(frames)[None]).pooler_output[0].numpy()
        hidden = model.vision_model(pixel_values=torch.from_numpy(frames)).last_hidden_state.numpy()
    np.testing.assert_allclose(enc.hidden_states(frames), hidden.reshape(-1, hidden.shape[-1]), **TOL)
    mine = enc.encode(frames)
    assert mine.shape == ref.shape == (12, 64)
    np.testing.assert_allclose(mine, ref, **TOL)
    np.testing.assert_array_equal(enc.projected(frames), mine)  # no pooling after the projection
    enc.batch_frames = 1
    np.testing.assert_allclose(enc.encode(frames), mine, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", IDEFICS)
def test_tower_q8_0(vlm_llama_cpp, vlm_hf, hf_models, family):
    """The q8_0 mmproj (2-D matrices rounded to 8 bits): relative RMS error below 3 % of transformers' f32."""
    import torch

    import x2l_edge._core as core

    side = vlm_refs.family_info(vlm_hf[family]).image_size
    _, mmproj = vlm_llama_cpp("q8_0")[family]
    enc = core.VisionEncoder.from_gguf(str(mmproj), n_threads=2)
    frames = np.random.default_rng(4).standard_normal((2, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        ref = hf_models[family].model.get_image_features(torch.from_numpy(frames)[None]).pooler_output[0].numpy()
    mine = enc.encode(frames)
    rel = np.sqrt(np.mean((mine - ref) ** 2) / np.mean(ref ** 2))
    assert rel < 0.03, rel


# ----------------------------------------------------------------------------- preprocessing and prompt text


def test_preprocess_matches_processor():
    """resize_frame is Pillow's LANCZOS twice (longest edge, then the square), uint8-exact; preprocess equals
    transformers' SmolVLM processor (no tiling) to float32 rounding, for frames that shrink, grow, and
    are wider, taller or square."""
    from PIL import Image

    from x2l_edge import smolvlm

    rng = np.random.default_rng(5)
    for shape in ((100, 150, 3), (300, 97, 3), (128, 128, 3), (37, 512, 3), (60, 90, 3)):
        img = (rng.random(shape) * 255).astype(np.uint8)
        h, w = shape[:2]
        if w >= h:  # transformers' rescale-to-max-len: the short side truncated, then made even
            nw, nh = 128, int(128 / (w / h))
            nh += nh % 2
        else:
            nh, nw = 128, int(128 * (w / h))
            nw += nw % 2
        pil = Image.fromarray(img).resize((nw, nh), Image.LANCZOS).resize((128, 128), Image.LANCZOS)
        np.testing.assert_array_equal(smolvlm.resize_frame(img, 128), np.asarray(pil))
        mine = smolvlm.preprocess([img], 128, [0.5] * 3, [0.5] * 3)
        np.testing.assert_allclose(mine, _hf_pixels(128, [img]), rtol=0, atol=1e-6)


def test_prompt_text_matches_processor():
    """The video text is SmolVLMProcessor.replace_video_token's (num2words counts, H:MM:SS duration, MM:SS
    stamps), and the whole prompt is transformers' default SmolVLM video template around it."""
    from types import SimpleNamespace

    from num2words import num2words
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    from x2l_edge import smolvlm

    stub = SimpleNamespace(image_seq_len=4, fake_image_token=smolvlm.FAKE, image_token=smolvlm.IMAGE,
                           global_image_token=smolvlm.GLOBAL)
    for n, fps, duration in ((8, 1.0, 8.4), (64, 0.5, 130.0), (3, 1 / 30, 95.0), (2, 1 / 3000, 9000.0)):
        ts = [i / fps for i in range(n)]
        meta = SimpleNamespace(fps=fps, timestamps=ts, duration=duration)
        assert smolvlm.video_text(ts, duration, 4) == SmolVLMProcessor.replace_video_token(
            stub, {"video_metadata": [meta]}, 0)
    for i in list(range(2100)) + [9999, 10001, 12345, 100000, 999999]:
        assert smolvlm.number_words(i) == num2words(i), i
    with pytest.raises(ValueError):
        smolvlm.number_words(10 ** 6)
    assert smolvlm.prompt_text(Q, [0, 1], 2, 4) == vn.smolvlm_video_prompt([0, 1], 2, 4, Q)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("family", IDEFICS)
def test_text_logits_match_transformers(vlm_llama_cpp, hf_models, family):
    """The llama model.gguf of the pair on a text prompt (prefill, then a decode continuation)."""
    import torch

    s = _session(vlm_llama_cpp, family)
    ids = s.tokenize("<|im_start|>User: What is the capital of France?<end_of_utterance>\nAssistant:")
    with torch.no_grad():
        ref = hf_models[family](input_ids=torch.tensor([ids])).logits[0].numpy()
    mine = np.concatenate([s.eval(ids[:6], all_logits=True), s.eval(ids[6:], all_logits=True)])
    np.testing.assert_allclose(mine, ref, **TOL)


def _prompt_pieces(s, media, video, ts, duration, system=None):
    """(head ids, frames embeddings, tail ids, the ids the runtime's layout stands for)."""
    from x2l_edge import smolvlm

    head = s.tokenize(smolvlm.prompt_head(len(ts), duration, system))
    rows = media.encode(list(video))
    embd = media.frames_embd(rows, ts)
    tail = s.tokenize(smolvlm.QUESTION_PREFIX + Q + smolvlm.QUESTION_SUFFIX)
    image = s.tokenize(smolvlm.IMAGE)
    frames_ids = [i for t in ts for i in s.tokenize(smolvlm.frame_head(t)) + image * media.tokens_per_frame
                  + media.fake_ids]
    return head, embd, tail, head + frames_ids + tail


@pytest.mark.parametrize("family", IDEFICS)
def test_video_prompt_logits_match_transformers(vlm_llama_cpp, vlm_hf, hf_models, family):
    """Session(model.gguf, mmproj=mmproj.gguf): 3 uint8 frames through the runtime's preprocessing, tower
    and timestamped layout; every prompt row's logits vs transformers fed the processor's text (tokenized
    by the HF tokenizer: the same ids) and pixel values."""
    import torch

    from x2l_edge import smolvlm

    path, info = vlm_hf[family], vlm_refs.family_info(vlm_hf[family])
    side = info.image_size
    s = _session(vlm_llama_cpp, family)
    assert s.has_vision and not s.is_qwen_vl
    media = smolvlm.SmolMedia(s)
    video = _video_u8(6, 3, side * 3 // 4, side + 10)
    ts, duration = [0.0, 1.0, 2.0], 3.0
    head, embd, tail, layout = _prompt_pieces(s, media, video, ts, duration, system="Be brief.")
    text = smolvlm.prompt_text(Q, ts, duration, 4, system="Be brief.")
    assert layout == _hf_ids(path, text)
    mine = np.concatenate([s.eval(head, all_logits=True), s._s.eval_embd(embd, all_logits=True),
                           s.eval(tail, all_logits=True)])
    with torch.no_grad():
        ref = hf_models[family](input_ids=torch.tensor([layout]),
                                pixel_values=torch.from_numpy(_hf_pixels(side, video)).float()[None]).logits[0]
    np.testing.assert_allclose(mine, ref.numpy(), **TOL)


# ----------------------------------------------------------------------------- ask: full KV and X²L


def test_ask_full_video(vlm_llama_cpp):
    """ask(video, q, mode='full') on 4 uint8 frames (an array: stamps 0..3 s, duration = the last stamp):
    the cache holds the layout above, and the first answer token is the argmax of the last prompt row
    computed by the pieces."""
    from x2l_edge import smolvlm

    s = _session(vlm_llama_cpp, "smolvlm")
    video = _video_u8(7, 4, 90, 160)
    answer = s.ask(video, Q, mode="full", max_tokens=3, chunk_frames=3)
    assert isinstance(answer, str)
    run = list(s._s.history)
    media = smolvlm.SmolMedia(s)
    head, embd, tail, _ = _prompt_pieces(s, media, video, [0.0, 1.0, 2.0, 3.0], 3.0)
    assert run[:len(head)] == head and run[len(head):len(head) + len(embd)] == [-1] * len(embd)
    assert run[len(head) + len(embd):len(head) + len(embd) + len(tail)] == tail
    generated = run[len(head) + len(embd) + len(tail):]
    s.reset()
    s._s.eval(head)
    s._s.eval_embd(embd)
    last = s.eval(tail, all_logits=True)[-1]
    assert generated and generated[0] == int(np.argmax(last))


def test_x2l_uncompressed_equals_full(vlm_llama_cpp):
    """X²L on a SmolVLM2 video: 6 frames in chunks of 2 (each frame's stamp text, image rows and wrapper
    tokens in its chunk), ratio 1 on both tiers: the mixed cache with every chunk reloaded, or none,
    reproduces the full-KV forward of the same prompt (atol = rtol = 1e-4)."""
    from x2l_edge import smolvlm

    s = _session(vlm_llama_cpp, "smolvlm", n_ctx=1024)
    video = _video_u8(8, 6, 128, 128)
    ctx = s.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, low_type="f32", high_type="f32")
    assert ctx.n_chunks == 3
    ours_all = ctx.logits(Q, range(3))
    ours_none = ctx.logits(Q, [])
    media = smolvlm.SmolMedia(s)
    head, embd, tail, _ = _prompt_pieces(s, media, video, [float(i) for i in range(6)], 5.0)
    assert ctx.question_ids(Q) == tail
    s.reset()
    s._s.eval(head)
    s._s.eval_embd(embd)
    ref = s.eval(tail, all_logits=True)
    np.testing.assert_allclose(ours_all, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_none, ref, rtol=1e-4, atol=1e-4)


def test_x2l_ask_selects_chunks(vlm_llama_cpp):
    """ask(video, q) in X²L mode: 8 frames, chunks of 2, compressed tiers (2x / 8x); each scorer selects
    top_k chunks, their L rows are reloaded, an answer is generated; the beacon compressor is refused."""
    s = _session(vlm_llama_cpp, "smolvlm", n_ctx=1024)
    video = _video_u8(9, 8, 100, 128)
    ctx = s.prefill(video, chunk_frames=2, ratio_low=2, ratio_high=8)
    assert ctx.n_chunks == 4
    for scorer in ("keys", "attention", "embedding"):
        chosen = ctx.select(question=Q, scorer=scorer, top_k=1)
        assert len(chosen) == 1 and 0 <= chosen[0] < 4
    assert isinstance(ctx.ask(Q, chunks=[3], max_tokens=3), str) and ctx.reload_stats()["n_chunks"] == 1
    assert isinstance(s.ask(video, Q, mode="x2l", chunk_frames=4, top_k=1, max_tokens=2), str)
    with pytest.raises(ValueError, match="beacon"):
        s.prefill(video, compressor="beacon")
    with pytest.raises(NotImplementedError, match="interleaved with their own prompt text"):
        next(s.video_chunks(video))


@pytest.mark.parametrize("mode", ["full", "x2l"])
def test_cli_ask_with_mmproj(vlm_llama_cpp, tmp_path, capsys, mode):
    """x2l-edge ask model.gguf video.mp4 question --mmproj mmproj.gguf on a 3 s file: SmolVLM2's default
    sampling takes 1 frame per second."""
    pytest.importorskip("cv2")
    from x2l_edge import cli
    from x2l_edge.video import write_video

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["smolvlm"])
    rng = np.random.default_rng(10)
    video = str(tmp_path / "v.mp4")
    assert write_video(video, ((rng.random((72, 96, 3)) * 255).astype(np.uint8) for _ in range(12)), 4.0) == 12
    argv = ["ask", model, video, Q, "--mmproj", mmproj, "--mode", mode, "-t", "2", "--max-tokens", "2"]
    if mode == "x2l":
        argv += ["--top-k", "1", "--chunk-frames", "1"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n")
    if mode == "x2l":
        assert "L reloaded for [" in err


def test_file_prompt_names_frames_and_duration(vlm_llama_cpp, tmp_path):
    """A 3 s file at 4 fps: 3 frames sampled (1 fps), the sink says 'three frames from a 0:00:03' video."""
    pytest.importorskip("cv2")
    from x2l_edge.video import write_video

    s = _session(vlm_llama_cpp, "smolvlm")
    rng = np.random.default_rng(11)
    video = str(tmp_path / "v.mp4")
    write_video(video, ((rng.random((72, 96, 3)) * 255).astype(np.uint8) for _ in range(12)), 4.0)
    ctx = s.prefill(video, chunk_frames=1)
    assert ctx.n_chunks == 3
    sink = s.detokenize(ctx.index.sink_tokens)
    assert sink.endswith("User: You are provided the following series of three frames from a 0:00:03 "
                         "[H:MM:SS] video.\n"), sink


# ----------------------------------------------------------------------------- errors and devices


def test_pair_errors(vlm_llama_cpp, tmp_path):
    import gguf

    import x2l_edge
    import x2l_edge._core as core
    from test_vision import copy_gguf

    pairs = vlm_llama_cpp("f32")
    smol_model, smol_mmproj = (str(p) for p in pairs["smolvlm"])
    qwen_model, qwen_mmproj = (str(p) for p in pairs["qwen2vl"])
    internvl_model = str(pairs["internvl"][0])
    with pytest.raises(core.FormatError, match="M-RoPE"):
        x2l_edge.Session(qwen_model, mmproj=smol_mmproj, device="cpu")
    with pytest.raises(core.FormatError, match="M-RoPE"):
        x2l_edge.Session(smol_model, mmproj=qwen_mmproj, device="cpu")
    # a 1-D LLM of the right width whose vocabulary lacks SmolVLM's image tokens
    with pytest.raises(core.FormatError, match="no <fake_token_around_image> token"):
        x2l_edge.Session(internvl_model, mmproj=smol_mmproj, device="cpu")
    no_scale = copy_gguf(smol_mmproj, tmp_path / "no_scale.gguf", drop_keys={"clip.vision.projector.scale_factor"})
    with pytest.raises(core.FormatError, match="clip.vision.projector.scale_factor"):
        core.VisionEncoder.from_gguf(no_scale)
    bad_scale = copy_gguf(smol_mmproj, tmp_path / "bad_scale.gguf",
                          set_keys={"clip.vision.projector.scale_factor": (3, gguf.GGUFValueType.UINT32)})
    with pytest.raises(core.FormatError, match="does not divide"):
        core.VisionEncoder.from_gguf(bad_scale)
    no_fc = copy_gguf(smol_mmproj, tmp_path / "no_fc.gguf", drop_tensors={"mm.model.fc.weight"})
    with pytest.raises(core.FormatError, match="missing required tensor 'mm.model.fc.weight'"):
        core.VisionEncoder.from_gguf(no_fc)
    no_post = copy_gguf(smol_mmproj, tmp_path / "no_post.gguf", drop_tensors={"v.post_ln.bias"})
    with pytest.raises(core.FormatError, match="v.post_ln.bias"):
        core.VisionEncoder.from_gguf(no_post)
    s = x2l_edge.Session(smol_model, mmproj=smol_mmproj, device="cpu")
    with pytest.raises(core.Error, match="pixels must have shape"):
        s.vision.encode(np.zeros((1, 3, 64, 64), np.float32))


def test_device_choice(vlm_llama_cpp, monkeypatch):
    """The CUDA backend has no pixel-shuffle connector: asking for the tower on a device is an Error (not a
    FormatError), which Session's device handling turns into a CPU tower with a RuntimeWarning; device='auto'
    in a build or machine without a usable device runs everything on the CPU."""
    import x2l_edge
    import x2l_edge._core as core
    from x2l_edge import device as _device

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["smolvlm"])
    with pytest.raises(core.Error, match="pixel-shuffle") as e:
        core.VisionEncoder.from_gguf(mmproj, n_threads=1, device=0)
    assert not isinstance(e.value, core.FormatError)
    monkeypatch.setattr(_device, "_warned", set())
    with pytest.warns(RuntimeWarning, match="pixel-shuffle"):
        enc = _device.open_vision(mmproj, "cuda:0", 1)
    assert enc.device == "cpu" and enc.config["projector"] == "pixel_shuffle"
    s = x2l_edge.Session(model, mmproj=mmproj, device="auto", n_threads=2)
    if not core.cuda_built() or core.cuda_emulated() or core.cuda_device_count() == 0:
        assert s.device == "cpu"
    assert s.vision.device == "cpu"


def test_merged_single_file(vlm_llama_cpp, tmp_path):
    """tools/merge_mmproj.py: model.gguf + mmproj.gguf -> one file; Session(merged) answers exactly as
    Session(model, mmproj=...) (the same bytes through the same code); merging twice or a non-mmproj is refused."""
    import merge_mmproj

    import x2l_edge

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["smolvlm"])
    out = str(tmp_path / "merged.gguf")
    info = merge_mmproj.merge(model, mmproj, out)
    assert info["vision_tensors"] > 0 and info["clip_keys"] > 0
    pair = _session(vlm_llama_cpp, "smolvlm")
    one = x2l_edge.Session(out, device="cpu", kv_type="f32", n_threads=2)
    assert one.has_vision and one.mmproj is None
    video = _video_u8(12, 2, 64, 96)
    assert pair.ask(video, Q, mode="full", max_tokens=3) == one.ask(video, Q, mode="full", max_tokens=3)
    assert list(pair._s.history) == list(one._s.history)
    np.testing.assert_array_equal(pair._s.logits(), one._s.logits())
    with pytest.raises(merge_mmproj.MergeError, match="merged already"):
        merge_mmproj.merge(out, mmproj, str(tmp_path / "twice.gguf"))
    with pytest.raises(merge_mmproj.MergeError, match="not an mmproj"):
        merge_mmproj.merge(model, model, str(tmp_path / "bad.gguf"))
