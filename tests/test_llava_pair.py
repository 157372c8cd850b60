"""LLaVA-1.5 model + mmproj pairs as llama.cpp writes them: the LLM by its convert_hf_to_gguf.py, the mmproj by
its legacy tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py (convert_hf_to_gguf.py writes no LLaVA
mmproj), on a tiny random LlavaForConditionalGeneration (tests/vlm_refs.make_tiny_llava) split as llava_surgery
does (tools/llama_cpp_converter.convert_legacy_llava).

The legacy script always stores the patch kernel and the projector matrices in f16, so the reference is
transformers with those weights rounded to f16 the same way (everything else f32): tower embeddings and
prompt logits then agree to atol = rtol = 1e-3 (measured ~1e-5); with the f32 originals the f16 rounding
alone moves embeddings by ~3e-4 relative.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

TOL = dict(rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(hf_dir, model.gguf, mmproj.gguf)."""
    import llama_cpp_converter as lcc
    import vlm_refs

    try:
        tree = lcc.fetch()
        lcc.legacy_llava_script(tree)
    except lcc.ConverterUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"llama.cpp's converter is unavailable here: {e}")
    base = tmp_path_factory.mktemp("llava")
    hf = vlm_refs.make_tiny_llava(base / "hf", seed=7)
    vision_dir, projector = vlm_refs.split_llava(hf, base / "split")
    mmproj = lcc.convert_legacy_llava(vision_dir, projector, base / "out", tree)
    model = base / "out" / "model-f32.gguf"
    lcc.convert_jobs([(str(hf), str(model), "f32", False)], tree)
    return hf, model, mmproj


@pytest.fixture(scope="module")
def hf_model(llava):
    """transformers' model with the weights the legacy mmproj keeps in f16 rounded to f16."""
    import torch
    import vlm_refs

    m = vlm_refs.load_model(llava[0])
    with torch.no_grad():
        for p in (m.model.vision_tower.embeddings.patch_embedding.weight, m.model.multi_modal_projector.linear_1.weight,
                  m.model.multi_modal_projector.linear_2.weight):
            p.copy_(p.half().float())
    return m


def _session(llava, **kw):
    import x2l_edge

    _, model, mmproj = llava
    return x2l_edge.Session(str(model), mmproj=str(mmproj), device="cpu", kv_type="f32", n_threads=2, **kw)


def test_llava_pair_tower_and_prompt_logits_match_transformers(llava, hf_model):
    """The tower (CLIP cut after hidden_states[-2], CLS dropped, fc1/fc2 read from the legacy names) and the
    projector give transformers' image features; a prompt of text, two images' tokens and text gives its
    logits."""
    s = _session(llava)
    c = s.vision.config
    assert (c["kind"], c["act"], c["n_layer_run"], c["tokens_per_frame"]) == ("clip", "quick_gelu", 2, 16)
    _check_against(s, hf_model)


def test_convert_py_llava15_single_file(llava, tmp_path):
    """tools/convert.py on the same LlavaForConditionalGeneration checkpoint: one GGUF (all weights f32) whose
    embeddings and prompt logits match transformers' unrounded model at 1e-3, with the pair's prompt tokens,
    tower settings and preprocessing, and which answers in full and X²L modes."""
    import convert
    import vlm_refs

    import x2l_edge

    hf_dir = llava[0]
    out = convert.convert(str(hf_dir), str(tmp_path / "llava.gguf"), "f32", progress=False)
    one = x2l_edge.Session(str(out), device="cpu", kv_type="f32", n_threads=2, n_ctx=1024)
    pair = _session(llava)
    for key in ("kind", "act", "n_layer_run", "tokens_per_frame", "resize", "resample", "drop_cls"):
        assert one.vision.config[key] == pair.vision.config[key], key
    assert one.tokenize("describe the frames<|im_end|>") == pair.tokenize("describe the frames<|im_end|>")
    _check_against(one, vlm_refs.load_model(hf_dir))
    video = (np.random.default_rng(6).random((4, 60, 80, 3)) * 255).astype(np.uint8)
    for mode in ("full", "x2l"):
        assert isinstance(one.ask(video, "What happens?", mode=mode, chunk_frames=2, top_k=1, max_tokens=3), str)


def _check_against(s, hf_model):
    """Image features of two frames and the logits of text + their tokens + text, vs transformers (TOL)."""
    import torch

    px = np.random.default_rng(3).standard_normal((2, 3, 56, 56)).astype(np.float32)
    ours = s.encode_frames(px)
    with torch.no_grad():
        feats = hf_model.get_image_features(pixel_values=torch.from_numpy(px))
    feats = getattr(feats, "pooler_output", feats)
    ref = torch.cat(list(feats)).reshape(ours.shape).numpy() if isinstance(feats, (list, tuple)) else \
        feats.reshape(ours.shape).numpy()
    np.testing.assert_allclose(ours, ref, **TOL)

    head = s.tokenize("<|im_start|>user\nwhat is in these frames", special=False)
    tail = s.tokenize("\ndescribe them<|im_end|>\n<|im_start|>assistant\n")
    image_id = hf_model.config.image_token_id
    s.reset()
    s._s.eval(head)
    s._s.eval_embd(ours)
    logits = s.eval(tail, all_logits=True)
    ids = head + [image_id] * len(ours) + tail
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px)).logits[0].numpy()
    np.testing.assert_allclose(logits, ref[-len(tail):], **TOL)


def test_llava_pair_asks_in_full_and_x2l_modes(llava):
    """ask(video, q) on the pair: full KV, and X²L whose mixed cache with every chunk reloaded at ratio 1 gives
    the full-KV logits (atol = rtol = 1e-4); the CLI takes the pair with --mmproj."""
    s = _session(llava, n_ctx=1024)
    video = (np.random.default_rng(4).random((4, 60, 80, 3)) * 255).astype(np.uint8)
    q = "What happens?"
    full = s.ask(video, q, mode="full", max_tokens=3, chunk_frames=2)
    assert isinstance(full, str)
    ctx = s.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, low_type="f32", high_type="f32")
    assert ctx.n_chunks == 2
    ours = ctx.logits(q, [0, 1])
    from x2l_edge.x2l import split_template

    prefix, suffix = split_template(s, None)
    s.reset()
    s._s.eval(s.tokenize(prefix))
    for embd in s.video_chunks(video, chunk_frames=2):
        s._s.eval_embd(embd)
    ref = s.eval(ctx.question_ids(q), all_logits=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    answer = s.ask(video, q, mode="x2l", chunk_frames=2, top_k=1, max_tokens=3)
    assert isinstance(answer, str)


def test_llava_mmproj_errors(llava, tmp_path):
    """What the runtime does not run is a FormatError naming it: LLaVA-1.6 anyres tiles, several feature layers,
    an 'mlp' projector with neither x2l.vision.* keys nor clip.has_llava_projector."""
    import x2l_edge
    from x2l_edge import _core

    _, model, mmproj = llava

    def rewrite(name, drop=(), add=()):
        import gguf

        r = gguf.GGUFReader(str(mmproj))
        w = gguf.GGUFWriter(str(tmp_path / name), "clip")
        for key, f in r.fields.items():
            if key.startswith(("GGUF.", "general.architecture")) or key in drop:
                continue
            v = f.contents()
            t = f.types[0]
            if t == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, v, t, sub_type=f.types[-1])
            else:
                w.add_key_value(key, v, t)
        for key, value, t, sub in add:
            w.add_key_value(key, value, t, sub_type=sub)
        for t in r.tensors:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    import gguf

    V = gguf.GGUFValueType
    cases = [
        (rewrite("anyres.gguf", add=[("clip.vision.image_grid_pinpoints", [56, 112], V.ARRAY, V.INT32)]), "LLaVA-1.6"),
        (rewrite("layers.gguf", add=[("clip.vision.feature_layer", [1, 2], V.ARRAY, V.INT32)]), "several feature"),
        (rewrite("nollava.gguf", drop=("clip.has_llava_projector",)), "clip.has_llava_projector"),
    ]
    for path, match in cases:
        with pytest.raises(_core.FormatError, match=match):
            x2l_edge.Session(str(model), mmproj=path, device="cpu")


def test_llava_pair_merged_single_file(llava, tmp_path):
    """tools/merge_mmproj.py on the pair: Session(merged) encodes frames and answers exactly as the pair (the
    tower's own settings decide the preprocessing: CLIP's shortest-side resize and centre crop)."""
    import merge_mmproj

    import x2l_edge

    _, model, mmproj = llava
    out = str(tmp_path / "merged.gguf")
    merge_mmproj.merge(str(model), str(mmproj), out)
    one = x2l_edge.Session(out, device="cpu", kv_type="f32", n_threads=2)
    pair = _session(llava)
    assert one.preprocessor.resize == pair.preprocessor.resize == "shortest_center_crop"
    video = (np.random.default_rng(5).random((2, 60, 80, 3)) * 255).astype(np.uint8)
    assert one.ask(video, "What happens?", mode="full", max_tokens=3) == pair.ask(video, "What happens?", mode="full",
                                                                                 max_tokens=3)
    np.testing.assert_array_equal(one._s.logits(), pair._s.logits())


def test_serve_llava_pair(llava, tmp_path):
    """x2l-edge serve MODEL --mmproj MMPROJ on the LLaVA-1.5 pair: a video_url chat answers as Session.ask with the
    same settings in this process (greedy)."""
    pytest.importorskip("httpx")
    pytest.importorskip("cv2")
    from test_server import ServerProc

    import x2l_edge
    from x2l_edge.video import write_video

    _, model, mmproj = llava
    media = tmp_path / "media"
    media.mkdir()
    video = media / "clip.mkv"
    rng = np.random.default_rng(8)
    assert write_video(str(video), ((rng.random((56, 84, 3)) * 255).astype(np.uint8) for _ in range(8)), 4.0,
                       codec="FFV1") == 8
    q = "What happens in the video?"
    s = x2l_edge.Session(str(model), mmproj=str(mmproj), n_threads=2, n_ctx=4096, device="cpu")
    want = s.ask(str(video), q, max_frames=8, chunk_frames=4, top_k=1, max_tokens=6, progress=False)
    srv = ServerProc([str(model), "--mmproj", str(mmproj), "--media-dir", str(media), "--index-dir",
                      str(tmp_path / "indexes")], cwd=str(tmp_path))
    try:
        body = {"model": "m", "temperature": 0, "max_tokens": 6, "x2l": {"max_frames": 8, "chunk_frames": 4, "top_k": 1},
                "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video.as_uri()}},
                                                          {"type": "text", "text": q}]}]}
        r = srv.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        assert r.json()["x2l"]["n_chunks"] == 2
    finally:
        srv.stop()
