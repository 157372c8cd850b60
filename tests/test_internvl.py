"""InternVL 2.5 / 3 through the runtime, on llama.cpp's own two-file GGUFs of the tiny checkpoint
(tests/vlm_refs.py make_tiny_internvl: InternViT of width 32, 4 blocks with layer scales, 56 px / 14 ->
4x4 patches + CLS, pixel shuffle 2 -> 4 tokens per frame, a Qwen2 LLM of width 64), converted by
tools/llama_cpp_converter.py, against transformers' InternVLForConditionalGeneration.

A second tiny checkpoint has the InternViT-6B block layout (RMSNorm blocks, q/k RMSNorm, no q/k/v
biases) to cover the tower's optional parts.

Tolerances: the runtime computes in float32 with an f32 KV cache (kv_type="f32") on f32 weights,
transformers in float32; tower outputs reach ~13 and logits ~8, so atol = rtol = 1e-3 is a wide margin
while a missing layer scale, a CLS row left in the shuffle or a misplaced frame moves them by > 0.05.
q8_0 mmproj: the 2-D weights themselves are rounded, so the bound is a relative RMS error. X²L with
ratio 1 on both tiers keeps every entry, so it must reproduce full KV to float32 rounding (atol = rtol
= 1e-4). Preprocessing is Pillow-exact (uint8 equality), so the normalised pixels equal transformers'
Pillow-backend processor (float32 rounding).
"""
from __future__ import annotations

import numpy as np
import pytest

import vlm_refs

TOL = dict(rtol=1e-3, atol=1e-3)
Q = "What happens?"
SIDE = 56
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def hf_model(vlm_hf):
    return vlm_refs.load_model(vlm_hf["internvl"])


@pytest.fixture(scope="module")
def six_b(tmp_path_factory, vlm_llama_cpp):
    """(HF dir, mmproj-f32.gguf) of a tiny checkpoint with InternViT-6B's block layout."""
    import llama_cpp_converter as lcc

    vlm_llama_cpp("f32")  # the same converter tree (skips when it is unavailable)
    base = tmp_path_factory.mktemp("internvl_6b")
    hf = vlm_refs.make_tiny_internvl(base / "hf", seed=31, vision_config=dict(
        norm_type="rms_norm", use_qk_norm=True, attention_bias=False))
    mmproj = base / "mmproj-f32.gguf"
    lcc.convert_jobs([(str(hf), str(mmproj), "f32", True)])
    return hf, mmproj


def _session(vlm_llama_cpp, outtype="f32", **kw):
    import x2l_edge

    model, mmproj = vlm_llama_cpp(outtype)["internvl"]
    kw = {"device": "cpu", "kv_type": "f32", "n_threads": 2, **kw}
    return x2l_edge.Session(str(model), mmproj=str(mmproj), **kw)


def _video_u8(seed, n, h, w):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


def _hf_ids(path, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _hf_pixels(frames):
    """transformers' InternVL image processor (GotOcr2, Pillow backend) on each frame as one tile:
    crop_to_patches=False, bicubic to SIDE x SIDE, ImageNet mean/std (the tiny's preprocessor_config)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(crop_to_patches=False, size={"height": SIDE, "width": SIDE}, image_mean=MEAN,
                                    image_std=STD, resample=3)  # 3 = PILImageResampling.BICUBIC
    return proc(images=list(frames), return_tensors="np")["pixel_values"]  # [F, 3, SIDE, SIDE]


def _hf_image_features(model, pixels):
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(np.asarray(pixels, np.float32)))
    out = getattr(out, "pooler_output", out)
    return out.reshape(-1, out.shape[-1]).numpy()


# ----------------------------------------------------------------------------- the tower


def test_tower_matches_transformers(vlm_llama_cpp, hf_model):
    """InternViT + pixel shuffle + projector on llama.cpp's mmproj.gguf vs transformers' get_image_features
    (and the CLS-less last hidden state vs its vision tower), 3 frames, f32."""
    import torch

    import x2l_edge._core as core

    _, mmproj = vlm_llama_cpp("f32")["internvl"]
    enc = core.VisionEncoder.from_gguf(str(mmproj), n_threads=2)
    cfg = enc.config
    assert (cfg["kind"], cfg["projector"], cfg["scale_factor"], cfg["act"]) == ("internvit", "shuffle_mlp", 2, "gelu")
    assert (cfg["layer_scale"], cfg["qk_norm"], cfg["rms_norm"], cfg["pre_norm"], cfg["has_cls"]) == (
        True, False, False, False, True)
    assert cfg["image_size"] == SIDE and cfg["tokens_per_frame"] == 4 and enc.n_embd == 64
    np.testing.assert_allclose(cfg["image_mean"], MEAN, rtol=1e-6)
    frames = np.random.default_rng(3).standard_normal((3, 3, SIDE, SIDE)).astype(np.float32)
    with torch.no_grad():
        hidden = hf_model.model.vision_tower(pixel_values=torch.from_numpy(frames)).last_hidden_state.numpy()
    np.testing.assert_allclose(enc.hidden_states(frames), hidden[:, 1:].reshape(-1, hidden.shape[-1]), **TOL)
    ref = _hf_image_features(hf_model, frames)
    mine = enc.encode(frames)
    assert mine.shape == ref.shape == (12, 64)
    np.testing.assert_allclose(mine, ref, **TOL)
    np.testing.assert_array_equal(enc.projected(frames), mine)  # no pooling after the projector
    enc.batch_frames = 1
    np.testing.assert_allclose(enc.encode(frames), mine, rtol=0, atol=1e-6)


def test_tower_6b_layout(six_b):
    """The InternViT-6B block layout (RMSNorm blocks, q/k RMSNorm over the width, no q/k/v biases) read from
    the tensors llama.cpp's converter writes, vs transformers, f32."""
    import x2l_edge._core as core

    hf, mmproj = six_b
    enc = core.VisionEncoder.from_gguf(str(mmproj), n_threads=2)
    assert (enc.config["rms_norm"], enc.config["qk_norm"], enc.config["layer_scale"]) == (True, True, True)
    frames = np.random.default_rng(4).standard_normal((2, 3, SIDE, SIDE)).astype(np.float32)
    np.testing.assert_allclose(enc.encode(frames), _hf_image_features(vlm_refs.load_model(hf), frames), **TOL)


def test_tower_q8_0(vlm_llama_cpp, hf_model):
    """The q8_0 mmproj (2-D matrices rounded to 8 bits): relative RMS error below 3 % of transformers' f32."""
    import x2l_edge._core as core

    _, mmproj = vlm_llama_cpp("q8_0")["internvl"]
    enc = core.VisionEncoder.from_gguf(str(mmproj), n_threads=2)
    frames = np.random.default_rng(4).standard_normal((2, 3, SIDE, SIDE)).astype(np.float32)
    ref = _hf_image_features(hf_model, frames)
    mine = enc.encode(frames)
    rel = np.sqrt(np.mean((mine - ref) ** 2) / np.mean(ref ** 2))
    assert rel < 0.03, rel


# ----------------------------------------------------------------------------- preprocessing and prompt text


def test_preprocess_matches_processor():
    """preprocess: one bicubic tile per frame, equal to transformers' InternVL image processor (GotOcr2,
    Pillow backend, crop_to_patches=False) for frames that shrink, grow, and are wider, taller or square."""
    from x2l_edge import internvl

    rng = np.random.default_rng(5)
    for shape in ((100, 150, 3), (300, 97, 3), (56, 56, 3), (37, 512, 3), (30, 40, 3)):
        img = (rng.random(shape) * 255).astype(np.uint8)
        np.testing.assert_allclose(internvl.preprocess([img], SIDE, MEAN, STD), _hf_pixels([img]), rtol=0, atol=1e-6)


def test_prompt_text_matches_processor(vlm_hf):
    """The video text is InternVLProcessor.replace_video_token's; the whole prompt is the chat template's
    user turn (video, then the question) with <video> replaced by it, as the processor does."""
    from types import SimpleNamespace

    from transformers import PreTrainedTokenizerFast
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    from x2l_edge import internvl

    stub = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                           image_seq_length=4)
    for n in (1, 3, 12):
        video = {"pixel_values_videos": [np.zeros((n, 3, 2, 2))]}
        assert internvl.video_text(n, 4) == InternVLProcessor.replace_video_token(stub, video, 0)
    tok = PreTrainedTokenizerFast.from_pretrained(str(vlm_hf["internvl"]))
    for system in (None, "Be brief."):
        msgs = ([] if system is None else [{"role": "system", "content": system}]) + [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": Q}]}]
        templ = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert internvl.prompt_text(Q, 3, 4, system=system) == templ.replace("<video>\n",
                                                                              internvl.video_text(3, 4) + "\n")


def _prompt_pieces(s, media, video, system=None):
    """(head ids, frames embeddings, tail ids, the ids the runtime's layout stands for)."""
    from x2l_edge import internvl

    head = s.tokenize(internvl.prompt_head(system))
    embd = media.frames_embd(media.encode(list(video)), 0)
    tail = s.tokenize(internvl.QUESTION_PREFIX + Q + internvl.QUESTION_SUFFIX)
    ctx = s.tokenize(internvl.CONTEXT)
    frames_ids = [i for f in range(len(video)) for i in s.tokenize(internvl.frame_head(f)) + ctx * 4 + media.end_ids]
    return head, embd, tail, head + frames_ids + tail


# ----------------------------------------------------------------------------- logits


def test_text_logits_match_transformers(vlm_llama_cpp, hf_model):
    """The qwen2 model.gguf of the pair on a text prompt (prefill, then a decode continuation)."""
    import torch

    s = _session(vlm_llama_cpp)
    ids = s.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    mine = np.concatenate([s.eval(ids[:6], all_logits=True), s.eval(ids[6:], all_logits=True)])
    np.testing.assert_allclose(mine, ref, **TOL)


def test_video_prompt_logits_match_transformers(vlm_llama_cpp, vlm_hf, hf_model):
    """Session(model.gguf, mmproj=mmproj.gguf): 3 uint8 frames through the runtime's preprocessing, tower and
    per-frame layout; the layout's token ids equal the HF tokenizer's on the processor's text, and every
    prompt row's logits match transformers fed those ids and the processor's pixel values."""
    import torch

    from x2l_edge import internvl

    s = _session(vlm_llama_cpp)
    assert s.has_vision and not s.is_qwen_vl
    media = internvl.InternMedia(s)
    video = _video_u8(6, 3, 42, 66)
    head, embd, tail, layout = _prompt_pieces(s, media, video, system="Be brief.")
    assert layout == _hf_ids(vlm_hf["internvl"], internvl.prompt_text(Q, 3, 4, system="Be brief."))
    mine = np.concatenate([s.eval(head, all_logits=True), s._s.eval_embd(embd, all_logits=True),
                           s.eval(tail, all_logits=True)])
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([layout]),
                       pixel_values=torch.from_numpy(_hf_pixels(video)).float()).logits[0]
    np.testing.assert_allclose(mine, ref.numpy(), **TOL)


# ----------------------------------------------------------------------------- ask: full KV and X²L


def test_ask_full_video(vlm_llama_cpp):
    """ask(video, q, mode='full') on 4 frames in groups of 3: the cache holds the layout above, and the first
    answer token is the argmax of the last prompt row computed by the pieces."""
    from x2l_edge import internvl

    s = _session(vlm_llama_cpp)
    video = _video_u8(7, 4, 90, 160)
    assert isinstance(s.ask(video, Q, mode="full", max_tokens=3, chunk_frames=3), str)
    run = list(s._s.history)
    head, embd, tail, _ = _prompt_pieces(s, internvl.InternMedia(s), video)
    assert run[:len(head)] == head and run[len(head):len(head) + len(embd)] == [-1] * len(embd)
    assert run[len(head) + len(embd):len(head) + len(embd) + len(tail)] == tail
    generated = run[len(head) + len(embd) + len(tail):]
    s.reset()
    s._s.eval(head)
    s._s.eval_embd(embd)
    last = s.eval(tail, all_logits=True)[-1]
    assert generated and generated[0] == int(np.argmax(last))


def test_x2l_uncompressed_equals_full(vlm_llama_cpp, tmp_path):
    """X²L on an InternVL video: 6 frames in chunks of 2 (each frame's 'FrameN: <img>' text, image rows and
    '</img>' in its chunk), ratio 1 on both tiers: the mixed cache with every chunk reloaded, or none,
    reproduces the full-KV forward of the same prompt (atol = rtol = 1e-4); so does the index saved and
    loaded back."""
    from x2l_edge import internvl
    from x2l_edge.x2l import VideoContext

    s = _session(vlm_llama_cpp, n_ctx=1024)
    video = _video_u8(8, 6, 56, 56)
    ctx = s.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, low_type="f32", high_type="f32")
    assert ctx.n_chunks == 3
    ours_all = ctx.logits(Q, range(3))
    ours_none = ctx.logits(Q, [])
    path = str(tmp_path / "v.x2l")
    ctx.save(path)
    loaded = VideoContext.load(s, path, **internvl.context_kwargs()).logits(Q, range(3))
    head, embd, tail, _ = _prompt_pieces(s, internvl.InternMedia(s), video)
    assert ctx.question_ids(Q) == tail
    s.reset()
    s._s.eval(head)
    s._s.eval_embd(embd)
    ref = s.eval(tail, all_logits=True)
    for ours in (ours_all, ours_none, loaded):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


SCORERS = ("keys", "attention", "embedding", "high", "high_keys")


def test_x2l_every_scorer_selects_and_answers(vlm_llama_cpp):
    """ask(video, q) in X²L mode: 8 frames, chunks of 2, compressed tiers (2x / 8x); every in-runtime scorer
    selects top_k chunks in range, their L rows are reloaded and an answer is generated; the beacon
    compressor and the single-file chunk stream are refused."""
    s = _session(vlm_llama_cpp, n_ctx=1024)
    video = _video_u8(9, 8, 60, 80)
    ctx = s.prefill(video, chunk_frames=2, ratio_low=2, ratio_high=8)
    assert ctx.n_chunks == 4
    for scorer in SCORERS:
        chosen = ctx.select(question=Q, scorer=scorer, top_k=2)
        assert len(chosen) == 2 and all(0 <= c < 4 for c in chosen), (scorer, chosen)
        assert isinstance(ctx.ask(Q, scorer=scorer, top_k=2, max_tokens=2), str)
        assert ctx.reload_stats()["n_chunks"] == 2
    assert isinstance(s.ask(video, Q, mode="x2l", chunk_frames=4, top_k=1, max_tokens=2), str)
    with pytest.raises(ValueError, match="beacon"):
        s.prefill(video, compressor="beacon")
    with pytest.raises(NotImplementedError, match="x2l_edge.internvl"):
        next(s.video_chunks(video))


@pytest.mark.parametrize("mode", ["full", "x2l"])
def test_cli_ask_with_mmproj(vlm_llama_cpp, tmp_path, capsys, mode):
    """x2l-edge ask model.gguf video.mp4 question --mmproj mmproj.gguf on a 12-frame file: a file is sampled
    uniformly (at most internvl.VIDEO_MAX_FRAMES frames; here every one of the 12)."""
    pytest.importorskip("cv2")
    from x2l_edge import cli
    from x2l_edge.video import write_video

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["internvl"])
    rng = np.random.default_rng(10)
    video = str(tmp_path / "v.mp4")
    assert write_video(video, ((rng.random((48, 64, 3)) * 255).astype(np.uint8) for _ in range(12)), 4.0) == 12
    argv = ["ask", model, video, Q, "--mmproj", mmproj, "--mode", mode, "-t", "2", "--max-tokens", "2"]
    if mode == "x2l":
        argv += ["--top-k", "1", "--chunk-frames", "4"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n")
    if mode == "x2l":
        assert "L reloaded for [" in err


# ----------------------------------------------------------------------------- errors and devices


def test_pair_errors(vlm_llama_cpp, tmp_path):
    """Wrong pairs and broken internvl mmproj files are FormatErrors naming what is wrong."""
    import gguf

    import x2l_edge
    import x2l_edge._core as core
    from test_vision import copy_gguf

    pairs = vlm_llama_cpp("f32")
    model, mmproj = (str(p) for p in pairs["internvl"])
    smol_model = str(pairs["smolvlm"][0])
    qwen_model = str(pairs["qwen2vl"][0])
    with pytest.raises(core.FormatError, match="no <img> token"):  # a 1-D LLM of the right width, other vocabulary
        x2l_edge.Session(smol_model, mmproj=mmproj, device="cpu")
    with pytest.raises(core.FormatError, match="M-RoPE"):
        x2l_edge.Session(qwen_model, mmproj=mmproj, device="cpu")
    cases = [
        (dict(drop_keys={"clip.vision.projector.scale_factor"}), "clip.vision.projector.scale_factor"),
        (dict(set_keys={"clip.vision.projector.scale_factor": (3, gguf.GGUFValueType.UINT32)}), "does not divide"),
        (dict(set_keys={"clip.use_gelu": (False, gguf.GGUFValueType.BOOL)}), "clip.use_gelu"),
        (dict(set_keys={"clip.vision.projection_dim": (32, gguf.GGUFValueType.UINT32)}), "projection_dim"),
        (dict(drop_tensors={"mm.model.mlp.3.weight"}), "missing required tensor 'mm.model.mlp.3.weight'"),
        (dict(drop_tensors={"v.class_embd"}), "'v.class_embd'"),
        (dict(drop_tensors={"v.blk.2.ls2.weight"}), "'v.blk.2.ls2.weight' \\(block 0 has it\\)"),
        (dict(drop_tensors={"v.blk.0.ls1.weight", "v.blk.0.ls2.weight"}), "'v.blk.1.ls1.weight' is present"),
        (dict(drop_tensors={"v.blk.1.ln1.bias", "v.blk.1.ln2.bias"}), "'v.blk.1.ln1.bias' \\(block 0"),
        (dict(drop_tensors={"v.blk.0.ln2.bias"}), "'v.blk.0.ln1.bias' and 'v.blk.0.ln2.bias' must both be present"),
    ]
    for i, (edit, match) in enumerate(cases):
        bad = copy_gguf(mmproj, tmp_path / f"bad{i}.gguf", **edit)
        with pytest.raises(core.FormatError, match=match):
            core.VisionEncoder.from_gguf(bad)
    s = x2l_edge.Session(model, mmproj=mmproj, device="cpu")
    with pytest.raises(core.Error, match="pixels must have shape"):
        s.vision.encode(np.zeros((1, 3, 64, 64), np.float32))


def test_device_choice(vlm_llama_cpp, monkeypatch):
    """The CUDA backend has no pixel-shuffle connector: the tower on a device is an Error (not a
    FormatError), which Session's device handling turns into a CPU tower with a RuntimeWarning."""
    import x2l_edge._core as core
    from x2l_edge import device as _device

    _, mmproj = (str(p) for p in vlm_llama_cpp("f32")["internvl"])
    with pytest.raises(core.Error, match="internvl") as e:
        core.VisionEncoder.from_gguf(mmproj, n_threads=1, device=0)
    assert not isinstance(e.value, core.FormatError)
    monkeypatch.setattr(_device, "_warned", set())
    with pytest.warns(RuntimeWarning, match="pixel-shuffle"):
        enc = _device.open_vision(mmproj, "cuda:0", 1)
    assert enc.device == "cpu" and enc.config["projector"] == "shuffle_mlp"


def test_merged_single_file(vlm_llama_cpp, tmp_path):
    """tools/merge_mmproj.py on an InternVL pair: Session(merged) answers exactly as the pair."""
    import merge_mmproj

    import x2l_edge

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["internvl"])
    out = str(tmp_path / "merged.gguf")
    assert merge_mmproj.merge(model, mmproj, out)["vision_tensors"] > 0
    pair = _session(vlm_llama_cpp)
    one = x2l_edge.Session(out, device="cpu", kv_type="f32", n_threads=2)
    video = _video_u8(12, 2, 64, 96)
    assert pair.ask(video, Q, mode="full", max_tokens=3) == one.ask(video, Q, mode="full", max_tokens=3)
    np.testing.assert_array_equal(pair._s.logits(), one._s.logits())
