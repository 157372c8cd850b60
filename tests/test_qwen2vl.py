"""Qwen2-VL / Qwen2.5-VL through the runtime, on llama.cpp's own two-file GGUFs of the tiny checkpoints
(tests/vlm_refs.py, converted by tools/llama_cpp_converter.py), against transformers.

The runtime reads model.gguf (architecture qwen2vl: qwen2 blocks + M-RoPE) and mmproj.gguf (the ViT and
merger). Tolerances: the runtime computes in float32 with an f32 KV cache (kv_type="f32") on f32 weights;
transformers in float32. Logits here have magnitudes up to ~8 and the measured worst difference is ~1e-5,
so atol = rtol = 1e-3 is a wide margin while a wrong M-RoPE axis or 1-D positions move logits by > 0.1
(test_vlm_refs shows that for the reference). q8_0 pairs: the weights themselves are rounded (~0.4 %
per value), so the check is the argmax of most rows and a relative RMS bound.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import vlm_numpy as vn
import vlm_refs

QWEN = ("qwen2vl", "qwen25vl")
TOL = dict(rtol=1e-3, atol=1e-3)


def _cfg(path):
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_models(vlm_hf):
    return {fam: vlm_refs.load_model(vlm_hf[fam]) for fam in QWEN}


@pytest.fixture(scope="module")
def state_dicts(vlm_hf):
    return {fam: vn.load_state_dict(vlm_hf[fam]) for fam in QWEN}


def _session(path, **kw):
    import x2l_edge

    return x2l_edge.Session(str(path), device="cpu", kv_type="f32", n_threads=2, **kw)


def _video_prompt(vlm_hf, family):
    """(ids, types, rows, grid, spg): the system + user(video, question) + assistant prompt of
    test_vlm_refs.test_qwen_video_prompt_logits_match_transformers (8 frames of 56x84, grid (4, 4, 6))."""
    path, info = vlm_hf[family], vlm_refs.family_info(vlm_hf[family])
    rows, grid = vn.qwen_patchify(np.random.default_rng(11).standard_normal((8, 3, 56, 84)))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    pre = enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    post = enc("What is in the video?<|im_end|>\n<|im_start|>assistant\n")
    media = vn.qwen_media_tokens(info.token_ids, grid, 2)
    ids = pre + media + post
    types = [vn.TEXT] * (len(pre) + 1) + [vn.VIDEO] * (len(media) - 2) + [vn.TEXT] * (len(post) + 1)
    return ids, types, rows, grid, [info.temporal_patch / 2.0], info


def _hf_logits(model, ids, types=None, rows=None, grid=None, spg=None, family="qwen2vl"):
    import torch

    kw = {}
    if rows is not None:
        kw = dict(pixel_values_videos=torch.from_numpy(rows).float(), video_grid_thw=torch.tensor([grid]),
                  mm_token_type_ids=torch.tensor([types]))
        if family == "qwen25vl":
            kw["second_per_grid_ts"] = torch.tensor(spg)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **kw).logits[0].numpy()


@pytest.mark.parametrize("family", QWEN)
def test_qwen2vl_model_gguf_loads(vlm_llama_cpp, family):
    model_path, _ = vlm_llama_cpp("f32")[family]
    s = _session(model_path)
    info = s.info
    assert info["arch"] == "qwen2vl" and info["n_pos_axes"] == 3 and info["head_dim"] == 16


@pytest.mark.parametrize("family", QWEN)
def test_qwen2vl_text_logits_match_transformers(vlm_llama_cpp, vlm_hf, hf_models, family):
    """Text only: M-RoPE with (P, P, P) positions is plain RoPE; also the decode after a prefix."""
    model_path, _ = vlm_llama_cpp("f32")[family]
    s = _session(model_path)
    ids = s.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ref = _hf_logits(hf_models[family], ids)
    mine = s.eval(ids[:7], all_logits=True)
    rest = s.eval(ids[7:], all_logits=True)
    np.testing.assert_allclose(np.concatenate([mine, rest]), ref, **TOL)


@pytest.mark.parametrize("family", QWEN)
def test_qwen2vl_video_prompt_logits_match_transformers(vlm_llama_cpp, vlm_hf, hf_models, state_dicts, family):
    """The video prompt with the reference tower's embeddings (the runtime's LLM and positions only);
    text after the video by transformers 5.x's rule (text_after='spatial'); Qwen2.5 scales time by
    tokens_per_second. Then one decode token after the prompt (positions continue past the video)."""
    ids, types, rows, grid, spg, info = _video_prompt(vlm_hf, family)
    ref = _hf_logits(hf_models[family], ids, types, rows, grid, spg, family)
    feats = vn.qwen_vision_forward(state_dicts[family], _cfg(vlm_hf[family])["vision_config"], rows, [grid])
    model_path, _ = vlm_llama_cpp("f32")[family]
    s = _session(model_path)
    start = types.index(vn.VIDEO)
    end = start + int(np.sum(np.asarray(types) == vn.VIDEO))
    a = s.eval(ids[:start], all_logits=True)
    b = s._s.eval_media(np.ascontiguousarray(feats, dtype=np.float32), *grid, video=True, seconds_per_grid=spg[0],
                        tokens_per_second=float(info.tokens_per_second or 0), text_after="spatial", all_logits=True)
    c = s.eval(ids[end:], all_logits=True)
    mine = np.concatenate([a, b, c])
    np.testing.assert_allclose(mine, ref, **TOL)
    # 1-D positions (the media as plain embeddings) would be visibly wrong
    s.reset()
    s.eval(ids[:start])
    s._s.eval_embd(np.ascontiguousarray(feats, dtype=np.float32))
    flat = s.eval(ids[end:], all_logits=True)
    assert np.abs(flat - ref[end:]).max() > 0.05


def test_qwen2vl_text_after_max_rule(vlm_llama_cpp, vlm_hf, state_dicts):
    """Qwen's own rule (text_after='max', the released checkpoints'): text continues at the run's largest
    position + 1. For grid (4, 4, 6) (merged 2 x 3, T = 4) that is start + 4, where transformers 5.x's
    'spatial' rule says start + 3; the logits after the video match the float64 NumPy reference run with
    the 'max' positions, and truncating back to the media run restores where text continues."""
    family = "qwen2vl"
    ids, types, rows, grid, spg, info = _video_prompt(vlm_hf, family)
    sd, cfg = state_dicts[family], _cfg(vlm_hf[family])
    model_path, _ = vlm_llama_cpp("f32")[family]
    s = _session(model_path)
    feats = vn.qwen_vision_forward(sd, cfg["vision_config"], rows, [grid])
    start = types.index(vn.VIDEO)
    n_media = int(np.sum(np.asarray(types) == vn.VIDEO))
    s.eval(ids[:start])
    import x2l_edge

    # A cancel requested before eval_media stops it (CancelledError) with nothing kept, then is cleared.
    s.cancel()
    with pytest.raises(x2l_edge.CancelledError):
        s._s.eval_media(np.ascontiguousarray(feats, dtype=np.float32), *grid, video=True, text_after="max")
    assert s._s.n_past == start and s._s.next_position == start and not s._s.cancel_requested
    s._s.eval_media(np.ascontiguousarray(feats, dtype=np.float32), *grid, video=True, text_after="max")
    assert s._s.next_position == start + 4
    tail = s.eval(ids[start + n_media:], all_logits=True)
    emb = sd["model.embed_tokens.weight"][ids]
    emb[np.asarray(types) == vn.VIDEO] = feats
    pos, _ = vn.mrope_positions(types, [grid], 2, text_after="max")
    ref = vn.llm_forward(sd, cfg["text_config"], emb, pos, prefix="model.")
    np.testing.assert_allclose(tail, ref[start + n_media:], **TOL)
    s._s.truncate(start + n_media)
    assert s._s.next_position == start + 4
    s._s.truncate(start)
    assert s._s.next_position == start


def _hf_visual(model, frames):
    import torch

    rows, grid = vn.qwen_patchify(frames)
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(rows).float(), grid_thw=torch.tensor([grid])).pooler_output
    return out.numpy(), grid


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vision_tower_matches_transformers(vlm_llama_cpp, hf_models, family):
    """The runtime's tower on llama.cpp's mmproj.gguf vs transformers' model.visual: a 5-frame video of
    168x224 (odd: the last frame repeats; merged 6 x 8, so Qwen2.5's 4x4-cell windows include partial
    ones) and an 84x56 image. Vision tokens have magnitudes up to ~5; f32 at atol = rtol = 1e-3."""
    import x2l_edge._core as core

    _, mmproj = vlm_llama_cpp("f32")[family]
    enc = core.QwenVision.from_gguf(str(mmproj), n_threads=2)
    assert enc.config["kind"] == family and enc.config["merge"] == 2
    rng = np.random.default_rng(8)
    for frames in (rng.standard_normal((5, 3, 168, 224)), rng.standard_normal((1, 3, 84, 56))):
        ref, grid = _hf_visual(hf_models[family], frames)
        mine = enc.encode(np.ascontiguousarray(frames, dtype=np.float32))
        assert mine.shape == ref.shape == (grid[0] * grid[1] * grid[2] // 4, 64)
        np.testing.assert_allclose(mine, ref, **TOL)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vision_tower_q8_0(vlm_llama_cpp, hf_models, family):
    """The q8_0 mmproj (2-D matrices rounded to 8 bits): relative RMS error below 3 % of transformers' f32."""
    import x2l_edge._core as core

    _, mmproj = vlm_llama_cpp("q8_0")[family]
    enc = core.QwenVision.from_gguf(str(mmproj), n_threads=2)
    frames = np.random.default_rng(9).standard_normal((2, 3, 112, 140))
    ref, _ = _hf_visual(hf_models[family], frames)
    mine = enc.encode(np.ascontiguousarray(frames, dtype=np.float32))
    rel = np.sqrt(np.mean((mine - ref) ** 2) / np.mean(ref ** 2))
    assert rel < 0.03, rel


def test_qwen_vision_bad_input(vlm_llama_cpp):
    import x2l_edge._core as core

    model, mmproj = vlm_llama_cpp("f32")["qwen2vl"]
    enc = core.QwenVision.from_gguf(str(mmproj), n_threads=1)
    with pytest.raises(core.Error, match="multiple of 28"):
        enc.encode(np.zeros((2, 3, 30, 56), np.float32))
    with pytest.raises(core.Error, match="shape"):
        enc.encode(np.zeros((3, 56, 56), np.float32))
    with pytest.raises(core.FormatError):
        core.QwenVision.from_gguf(str(model))  # the LLM file has no vision tower


# ----------------------------------------------------------------------------- the Python pipeline


def _pair_session(vlm_llama_cpp, family, **kw):
    import x2l_edge

    model, mmproj = vlm_llama_cpp("f32")[family]
    return x2l_edge.Session(str(model), mmproj=str(mmproj), device="cpu", kv_type="f32", n_threads=2, **kw)


def test_qwen_preprocess_matches_processor():
    """smart_resize + bicubic resize + normalisation + patch rows equal Qwen2VLImageProcessorPil's pixel_values
    for images that need resizing (PIL-exact resize: the same uint8 pixels; atol 1e-5 on normalised values)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from x2l_edge import qwen_vl

    rng = np.random.default_rng(6)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64, image_mean=vlm_refs.CLIP_MEAN,
                                    image_std=vlm_refs.CLIP_STD)
    for shape in ((100, 150, 3), (300, 97, 3), (40, 40, 3)):
        img = (rng.random(shape) * 255).astype(np.uint8)
        out = proc(images=[img], return_tensors="np")
        h, w = qwen_vl.smart_resize(shape[0], shape[1], 28, 56 * 56, 28 * 28 * 64)
        px = qwen_vl.preprocess([img], h, w, vlm_refs.CLIP_MEAN, vlm_refs.CLIP_STD)
        rows, grid = vn.qwen_patchify(px.astype(np.float64))
        assert grid == tuple(out["image_grid_thw"][0])
        np.testing.assert_allclose(rows, out["pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_image_prompt_through_session(vlm_llama_cpp, vlm_hf, hf_models, family):
    """Session(model.gguf, mmproj=mmproj.gguf): a uint8 image through the runtime's preprocessing, tower
    and M-RoPE placement; prompt logits vs transformers fed the processor's pixel_values (atol = rtol = 1e-3)."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from x2l_edge import qwen_vl

    s = _pair_session(vlm_llama_cpp, family)
    assert s.is_qwen_vl and s.has_vision
    img = (np.random.default_rng(21).random((90, 130, 3)) * 255).astype(np.uint8)
    media = qwen_vl.QwenMedia(s)
    embd, grid = media.encode([img], video=False, max_pixels=28 * 28 * 64)
    before, after = qwen_vl.prompt_parts(s, "Describe it.", "image")
    assert before.endswith("<|vision_start|>") and after.startswith("<|vision_end|>")
    pre, post = s.tokenize(before), s.tokenize(after)
    a = s.eval(pre, all_logits=True)
    b = s._s.eval_media(embd, *grid, video=False, text_after="spatial", all_logits=True)
    c = s.eval(post, all_logits=True)
    mine = np.concatenate([a, b, c])

    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64, image_mean=vlm_refs.CLIP_MEAN,
                                    image_std=vlm_refs.CLIP_STD)
    out = proc(images=[img], return_tensors="np")
    assert tuple(out["image_grid_thw"][0]) == grid
    pad = vlm_refs.family_info(vlm_hf[family]).token_ids["<|image_pad|>"]
    ids = pre + [pad] * len(embd) + post
    types = [vn.IMAGE if i == pad else vn.TEXT for i in ids]
    with torch.no_grad():
        ref = hf_models[family](input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(out["pixel_values"]).float(),
                                image_grid_thw=torch.tensor([grid]), mm_token_type_ids=torch.tensor([types])).logits[0]
    np.testing.assert_allclose(mine, ref.numpy(), **TOL)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_ask_full_video(vlm_llama_cpp, vlm_hf, hf_models, family):
    """ask(video, q, mode='full') on a llama.cpp pair, 4 uint8 frames (no timestamps: 2 fps assumed): the
    prompt it builds is the template's with one <|video_pad|> per merged cell; the same prompt's logits
    match transformers fed the same pixels (2 temporal patches: Qwen's 'max' rule and transformers'
    agree; atol = rtol = 1e-3); the first answer token is the argmax of the last prompt logits."""
    import torch

    from x2l_edge import qwen_vl

    s = _pair_session(vlm_llama_cpp, family)
    video = (np.random.default_rng(22).random((4, 56, 84, 3)) * 255).astype(np.uint8)
    kw = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)
    answer = s.ask(video, "What happens?", mode="full", max_tokens=4, **kw)
    assert isinstance(answer, str)
    ids_run = list(s._s.history)
    h, w = qwen_vl.smart_resize(56, 84, 28, kw["min_pixels"], kw["max_pixels"])
    px = qwen_vl.preprocess(list(video), h, w, vlm_refs.CLIP_MEAN, vlm_refs.CLIP_STD)
    rows, grid = vn.qwen_patchify(px.astype(np.float64))
    before, after = qwen_vl.prompt_parts(s, "What happens?", "video")
    pad = vlm_refs.family_info(vlm_hf[family]).token_ids["<|video_pad|>"]
    n_media = grid[0] * grid[1] * grid[2] // 4
    pre, post = s.tokenize(before), s.tokenize(after)
    ids = pre + [pad] * n_media + post
    assert ids_run[:len(ids)] == [i if i != pad else -1 for i in ids]
    generated = ids_run[len(ids):]
    # the same prompt again through the pieces ask() uses, with every row's logits
    s.reset()
    media = qwen_vl.QwenMedia(s)
    embd, g = media.encode(list(video), video=True, **kw)
    assert g == grid
    a = s.eval(pre, all_logits=True)
    b = s._s.eval_media(embd, *grid, video=True, merge=2, seconds_per_grid=1.0,
                        tokens_per_second=media.tokens_per_second, text_after="max", all_logits=True)
    c = s.eval(post, all_logits=True)
    mine = np.concatenate([a, b, c])
    types = [vn.VIDEO if i == pad else vn.TEXT for i in ids]
    extra = {"second_per_grid_ts": torch.tensor([1.0])} if family == "qwen25vl" else {}
    with torch.no_grad():
        ref = hf_models[family](input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(rows).float(),
                                video_grid_thw=torch.tensor([grid]), mm_token_type_ids=torch.tensor([types]),
                                **extra).logits[0].numpy()
    np.testing.assert_allclose(mine, ref, **TOL)
    assert generated and generated[0] == int(np.argmax(mine[-1]))


def test_qwen_pair_errors(vlm_llama_cpp):
    import x2l_edge
    import x2l_edge._core as core

    pairs = vlm_llama_cpp("f32")
    qwen_model, qwen_mmproj = (str(p) for p in pairs["qwen2vl"])
    smol_model = str(pairs["smolvlm"][0])  # SmolVLM2 pairs themselves: tests/test_smolvlm.py
    with pytest.raises(core.FormatError, match="M-RoPE"):
        x2l_edge.Session(smol_model, mmproj=qwen_mmproj, device="cpu")
    with pytest.raises(core.FormatError, match="not an mmproj"):
        x2l_edge.Session(qwen_model, mmproj=qwen_model, device="cpu")
    with pytest.raises(FileNotFoundError):
        x2l_edge.Session(qwen_model, mmproj="/nonexistent/mmproj.gguf", device="cpu")
    s = x2l_edge.Session(qwen_model, mmproj=qwen_mmproj, device="cpu")
    with pytest.raises(ValueError, match="beacon"):
        s.prefill(np.zeros((4, 56, 56, 3), np.uint8), compressor="beacon")
    with pytest.raises(ValueError, match="dense_positions"):
        s.prefill(np.zeros((4, 56, 56, 3), np.uint8), dense_positions=True)
    from x2l_edge.x2l import prefill_chunks

    with pytest.raises(x2l_edge.Error, match="dense_positions"):  # M-RoPE text: the C++ prefill refuses it
        prefill_chunks(s, [s.tokenize("a few words", special=False)], sink_ids=s.tokenize("x"), dense_positions=True)
    ctx = s.prefill(np.zeros((4, 56, 56, 3), np.uint8), chunk_frames=2, min_pixels=28 * 28 * 4,
                    max_pixels=28 * 28 * 4)
    with pytest.raises(NotImplementedError, match="M-RoPE"):
        next(s.video_chunks(np.zeros((4, 56, 56, 3), np.uint8)))


# ----------------------------------------------------------------------------- X²L on an M-RoPE model

_LONG = ("the model reads a long video and answers questions about what happens in each scene "
         "while the cache keeps only the tokens that matter for the next frame. ") * 6


def test_qwen2vl_x2l_text_uncompressed_equals_full(vlm_llama_cpp):
    """X²L on the qwen2vl LLM (M-RoPE): with ratio 1 on both tiers every entry is kept, so the chunked
    prefill + mixed cache (all chunks reloaded, or none) reproduce the plain forward over sink + chunks +
    question (text positions are (P, P, P) on every axis; keys keep their rotation; atol = rtol = 1e-4)."""
    from x2l_edge.x2l import VideoContext, prefill_chunks, split_template

    model, _ = vlm_llama_cpp("f32")["qwen2vl"]
    s = _session(model, n_ctx=512)
    ids = s.tokenize(_LONG, special=False)[:96]
    chunks = [ids[i:i + 24] for i in range(0, 96, 24)]
    prefix, suffix = split_template(s, "be brief")
    index, _ = prefill_chunks(s, chunks, sink_ids=s.tokenize(prefix), ratio_low=1, ratio_high=1, low_type="f32",
                              high_type="f32")
    ctx = VideoContext(s, index, question_suffix=suffix)
    q = "what does the cache keep?"
    ours_all = ctx.logits(q, range(len(chunks)))
    ours_none = ctx.logits(q, [])
    ref_ids = list(index.sink_tokens) + [t for c in chunks for t in c] + ctx.question_ids(q)
    s.reset()
    ref = s.eval(ref_ids, all_logits=True)[-len(ctx.question_ids(q)):]
    np.testing.assert_allclose(ours_all, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_none, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scorer", ["keys", "attention", "embedding", "high", "maxsim"])
def test_qwen2vl_x2l_text_ask_selects_chunks(vlm_llama_cpp, scorer):
    """prefill_text + ask on a llama.cpp qwen2vl pair: compressed tiers, a question selects top_k chunks
    by each scorer, their L rows are reloaded and an answer is generated."""
    import x2l_edge

    model, mmproj = vlm_llama_cpp("f32")["qwen2vl"]
    s = x2l_edge.Session(str(model), mmproj=str(mmproj), device="cpu", n_threads=2, n_ctx=512)
    ctx = s.prefill_text(_LONG, chunk_tokens=24, ratio_low=2, ratio_high=8)
    assert ctx.n_chunks >= 4
    chosen = ctx.select(question="what happens in each scene?", scorer=scorer, top_k=2)
    assert len(chosen) == 2 and all(0 <= c < ctx.n_chunks for c in chosen)
    answer = ctx.ask("what happens in each scene?", chunks=chosen, max_tokens=4)
    assert isinstance(answer, str)
    assert ctx.reload_stats()["n_chunks"] == 2


def _video_u8(seed, n=8, h=56, w=84):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_x2l_video_uncompressed_equals_full(vlm_llama_cpp, family):
    """X²L on a Qwen video (M-RoPE): 8 frames in chunks of 2 frames (one temporal pair each), ratio 1
    on both tiers: the chunks keep their (t, h, w) positions (Qwen2.5: time scaled by tokens_per_second)
    and the question continues at the video's text-after position, so the mixed cache with every chunk
    reloaded, or none, reproduces the full-KV forward of the same prompt (atol = rtol = 1e-4)."""
    from x2l_edge import qwen_vl

    s = _pair_session(vlm_llama_cpp, family, n_ctx=1024)
    video = _video_u8(31)
    kw = dict(min_pixels=28 * 28 * 6, max_pixels=28 * 28 * 6)
    ctx = s.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, low_type="f32", high_type="f32", **kw)
    assert ctx.n_chunks == 4
    q = "What happens?"
    ours_all = ctx.logits(q, range(4))
    ours_none = ctx.logits(q, [])
    media = qwen_vl.QwenMedia(s)
    embd, grid = media.encode(list(video), video=True, **kw)
    before, _ = qwen_vl.prompt_parts(s, q, "video")
    s.reset()
    s._s.eval(s.tokenize(before))
    media.append(embd, grid, video=True, fps=2.0)
    qids = ctx.question_ids(q)
    ref = s.eval(qids, all_logits=True)
    np.testing.assert_allclose(ours_all, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_none, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_x2l_video_ask_selects_chunks(vlm_llama_cpp, family):
    """ask(video, q) in X²L mode on a llama.cpp pair: 12 frames, chunks of 4, compressed tiers (2x / 8x);
    each scorer selects top_k chunks, their L rows are reloaded, and an answer is generated."""
    s = _pair_session(vlm_llama_cpp, family, n_ctx=1024)
    video = _video_u8(32, n=12)
    ctx = s.prefill(video, chunk_frames=4, ratio_low=2, ratio_high=8, min_pixels=28 * 28 * 8,
                    max_pixels=28 * 28 * 8)
    assert ctx.n_chunks == 3
    for scorer in ("keys", "attention", "embedding", "high", "high_keys", "maxsim"):
        chosen = ctx.select(question="What happens?", scorer=scorer, top_k=1)
        assert len(chosen) == 1 and 0 <= chosen[0] < 3
        low_read = ctx.score_stats()["low_bytes"]  # M-RoPE video: only attention reads the L tier
        assert low_read > 0 if scorer == "attention" else low_read == 0
    answer = ctx.ask("What happens?", chunks=[2], max_tokens=4)
    assert isinstance(answer, str) and ctx.reload_stats()["n_chunks"] == 1
    answer2 = s.ask(video, "What happens?", mode="x2l", chunk_frames=4, top_k=1, max_tokens=3,
                    min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 8)
    assert isinstance(answer2, str)
    import x2l_edge

    token = x2l_edge.CancelToken()
    token.cancel()  # the Qwen prefill is one operation on the session: a cancelled token stops it
    with pytest.raises(x2l_edge.CancelledError):
        s.prefill(video, chunk_frames=4, cancel=token, min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 8)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_x2l_index_saves_and_reloads(vlm_llama_cpp, tmp_path, family):
    """A Qwen video index (M-RoPE text position, entries rotated at their 3-D positions) saved in index
    format 5 and loaded again, into memory or with the L tier mapped: the text position is kept, and
    every scorer's scores and the logits of H-only and mixed caches are bit-identical to the index that
    was saved; VideoContext.load rebuilds the Qwen question layout. The same index given to a model
    without M-RoPE is refused."""
    import x2l_edge
    from x2l_edge import qwen_vl
    from x2l_edge.x2l import VideoContext

    s = _pair_session(vlm_llama_cpp, family, n_ctx=1024)
    ctx = s.prefill(_video_u8(33, n=12), chunk_frames=4, ratio_low=2, ratio_high=8, min_pixels=28 * 28 * 8,
                    max_pixels=28 * 28 * 8, system="be brief")
    text_pos = ctx.index.settings()["text_pos"]
    assert text_pos > len(ctx.index.sink_tokens)
    path = tmp_path / "qwen.x2l"
    ctx.save(path)
    assert path.read_bytes()[:8] == b"X2LIDX05"
    q = "What happens?"
    scorers = ("keys", "attention", "embedding", "high", "high_keys", "maxsim")
    want_scores = {sc: ctx.scores(q, scorer=sc) for sc in scorers}
    want = {tuple(ch): ctx.logits(q, ch) for ch in ([], [1], [0, 2])}
    for mmap in (False, True):
        loaded = VideoContext.load(s, path, mmap=mmap, system="be brief")
        assert loaded.index.settings()["text_pos"] == text_pos
        assert (loaded.question_prefix, loaded.question_suffix) == (ctx.question_prefix, ctx.question_suffix)
        assert loaded.question_ids(q) == ctx.question_ids(q)
        for sc in scorers:
            np.testing.assert_array_equal(loaded.scores(q, scorer=sc), want_scores[sc])
        for ch, ref in want.items():
            np.testing.assert_array_equal(loaded.logits(q, list(ch)), ref)
    assert qwen_vl.context_kwargs(s, "be brief")["question_prefix"].startswith("<|vision_end|>")
    # The text position bounds the entries' temporal positions: one moved before them is refused (re-sealed).
    import index_format as fmt

    raw = path.read_bytes()
    lay = fmt.layout(raw)
    bad = bytearray(raw)
    fmt.put(bad, lay["fields"]["text_pos"], len(ctx.index.sink_tokens) + 1)
    fmt.reseal(bad, lay, lay["fields"]["text_pos"][0])
    (tmp_path / "bad.x2l").write_bytes(bytes(bad))
    with pytest.raises(x2l_edge.FormatError, match="position out of place"):
        VideoContext.load(s, tmp_path / "bad.x2l")
    # An M-RoPE index on a plain-RoPE model (fingerprint aside, which a crafted file can copy).
    smol = x2l_edge.Session(str(vlm_llama_cpp("f32")["smolvlm"][0]), device="cpu", n_threads=1)
    with pytest.raises(x2l_edge.Error, match="different model|M-RoPE"):
        VideoContext.load(smol, path)


@pytest.mark.parametrize("mode", ["full", "x2l"])
def test_cli_ask_with_mmproj(vlm_llama_cpp, tmp_path, capsys, mode):
    """x2l-edge ask model.gguf video.mp4 question --mmproj mmproj.gguf, on a 2 s video file (sampled at 2 fps)."""
    pytest.importorskip("cv2")
    from x2l_edge import cli
    from x2l_edge.video import write_video

    model, mmproj = (str(p) for p in vlm_llama_cpp("f32")["qwen2vl"])
    rng = np.random.default_rng(41)
    video = str(tmp_path / "v.mp4")
    assert write_video(video, ((rng.random((56, 84, 3)) * 255).astype(np.uint8) for _ in range(8)), 4.0) == 8
    argv = ["ask", model, video, "What happens?", "--mmproj", mmproj, "--mode", mode, "-t", "2", "--max-tokens", "2"]
    if mode == "x2l":
        argv += ["--top-k", "1", "--chunk-frames", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n")  # the answer was printed
    if mode == "x2l":
        assert "L reloaded for [" in err
