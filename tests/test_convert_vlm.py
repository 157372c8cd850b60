"""tools/convert.py straight from Hugging Face for the families llama.cpp ships as two files (Qwen2-VL,
Qwen2.5-VL, SmolVLM2, Idefics3): one GGUF that holds llama.cpp's pair as tools/merge_mmproj.py merges it.

References: llama.cpp's own converter on the same tiny random checkpoints (tests/vlm_refs.py, converted
once per session by the vlm_llama_cpp fixture), and transformers. At f32 every tensor is bit-identical to
the pair's, so the runtime computes the same logits from either (checked exactly), and test_qwen2vl.py /
test_smolvlm.py pin those pairs against transformers at 1e-3; text logits are compared with transformers
here too (atol = rtol = 1e-3, as those files). At q8_0 the matrices are quantized by the same gguf-py
routine: bit-identical too, except kernels this converter keeps in f16 (within f16 rounding).
"""
from __future__ import annotations

import numpy as np
import pytest

FAMILIES = ("qwen2vl", "qwen25vl", "smolvlm", "idefics3")
TOL = dict(rtol=1e-3, atol=1e-3)
# Keys llama.cpp writes that carry nothing this converter's file lacks: the tokenizer's defaults (no BOS
# is added either way, add_eos false), and the head width that n_embd / n_head gives.
PAIR_ONLY = {"tokenizer.ggml.add_eos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_space_prefix",
             "llama.attention.key_length", "llama.attention.value_length"}
# What this converter adds: llama.cpp's LLM keys it always writes, and what the HF config says that
# llama.cpp's pair leaves to defaults (Qwen2.5's window and time scale, SmolVLM2's video frame size).
OURS_ONLY = {"qwen2vl.vocab_size", "qwen2vl.rope.dimension_count", "llama.vocab_size", "x2l.chat_format",
             "x2l.vision.window_size", "x2l.vision.tokens_per_second", "x2l.video.frame_size"}


@pytest.fixture(scope="module")
def converted(vlm_hf, tmp_path_factory):
    """{(family, outtype): one GGUF written by tools/convert.py from the tiny checkpoint}."""
    import convert

    d = tmp_path_factory.mktemp("convert_vlm")
    return {(fam, t): convert.convert(str(vlm_hf[fam]), str(d / f"{fam}-{t}.gguf"), t, progress=False)
            for fam in FAMILIES for t in ("f32", "q8_0")}


@pytest.fixture(scope="module")
def merged(vlm_llama_cpp, tmp_path_factory):
    """{(family, outtype): llama.cpp's pair merged by tools/merge_mmproj.py}."""
    import merge_mmproj

    d = tmp_path_factory.mktemp("merged_vlm")
    out = {}
    for t in ("f32", "q8_0"):
        for fam in FAMILIES:
            model, mmproj = vlm_llama_cpp(t)[fam]
            out[(fam, t)] = d / f"{fam}-{t}.gguf"
            merge_mmproj.merge(str(model), str(mmproj), str(out[(fam, t)]))
    return out


def _tensor_bytes(h, name, ne, ggml_type, rel) -> bytes:
    n = h.nbytes(ne, ggml_type)
    return h.data[h.data_start + rel:h.data_start + rel + n]


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_file_holds_the_merged_pair(converted, merged, family, outtype):
    """Every tensor of llama.cpp's merged pair, same name, shape and type, bit-identical data (q8_0: the
    patch kernels, f32 in llama.cpp's idefics3 file and f16 here, within f16 rounding); every key with
    the same value, byte for byte, but for the documented differences. (Headers parsed by
    tools/merge_mmproj.py's reader.)"""
    import gguf
    from merge_mmproj import _Header

    ours, pair = _Header(str(converted[(family, outtype)])), _Header(str(merged[(family, outtype)]))
    a = {t[0]: t for t in ours.tensors}
    b = {t[0]: t for t in pair.tensors}
    assert set(a) == set(b)
    for name, t in b.items():
        mine = a[name]
        assert mine[1] == t[1], name  # shape
        got, want = _tensor_bytes(ours, *mine), _tensor_bytes(pair, *t)
        if mine[2] == t[2]:
            assert got == want, name
        else:  # a kernel kept in f16 where llama.cpp keeps f32
            assert outtype == "q8_0" and name.startswith("v.patch_embd") and mine[2] == gguf.GGMLQuantizationType.F16
            w = np.frombuffer(want, np.float32)
            np.testing.assert_allclose(np.frombuffer(got, np.float16).astype(np.float32), w, rtol=1e-3,
                                       atol=1e-4 * np.abs(w).max())
    ka = {k for k in ours.kv if not k.startswith("general.")}
    kb = {k for k in pair.kv if not k.startswith("general.")}
    assert kb - ka <= PAIR_ONLY, kb - ka
    assert ka - kb <= OURS_ONLY, ka - kb
    for key in ka & kb:
        assert ours.kv[key] == pair.kv[key], key


def _session(path, **kw):
    import x2l_edge

    return x2l_edge.Session(str(path), device="cpu", kv_type="f32", n_threads=2, **kw)


def _video(seed, n, h, w):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_session_answers_as_the_pair_and_transformers(converted, vlm_llama_cpp, vlm_hf, family):
    """Session(converted) against Session(model.gguf, mmproj=mmproj.gguf) of llama.cpp's converter: the same
    prompt tokens, identical text logits (which match transformers at 1e-3), identical X²L video logits
    (ratio 1, every chunk reloaded) and the same full-KV and X²L answers."""
    import torch
    import vlm_refs

    one = _session(converted[(family, "f32")], n_ctx=1024)
    model, mmproj = vlm_llama_cpp("f32")[family]
    pair = _session(model, mmproj=str(mmproj), n_ctx=1024)
    assert one.has_vision and one.mmproj is None

    text = "the model reads a long video and answers questions about each scene"
    ids = pair.tokenize(text)
    assert one.tokenize(text) == ids
    logits = one.eval(ids, all_logits=True)
    np.testing.assert_array_equal(logits, pair.eval(ids, all_logits=True))
    hf = vlm_refs.load_model(vlm_hf[family])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits, ref, **TOL)

    qwen = family.startswith("qwen")
    video = _video(5, 4, 56, 84) if qwen else _video(5, 4, 64, 96)
    px = dict(min_pixels=28 * 28 * 6, max_pixels=28 * 28 * 6) if qwen else {}
    q = "What happens?"
    ctxs = [s.prefill(video, chunk_frames=2, ratio_low=1, ratio_high=1, low_type="f32", high_type="f32", **px)
            for s in (one, pair)]
    assert ctxs[0].question_ids(q) == ctxs[1].question_ids(q)
    chunks = list(range(ctxs[0].n_chunks))
    np.testing.assert_array_equal(ctxs[0].logits(q, chunks), ctxs[1].logits(q, chunks))
    for mode in ("full", "x2l"):
        kw = dict(mode=mode, max_tokens=3, **px)
        if mode == "x2l":
            kw.update(chunk_frames=2, top_k=1)
        assert one.ask(video, q, **kw) == pair.ask(video, q, **kw)


def test_convert_refuses_what_the_runtime_would_misread(vlm_hf, tmp_path):
    """A Qwen2.5-VL config whose full-attention blocks are not every n-th one, and a checkpoint missing a
    merger tensor, are ConvertErrors naming the problem (nothing is written)."""
    import json
    import shutil

    import convert

    src = vlm_hf["qwen25vl"]
    bad = tmp_path / "irregular"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["fullatt_block_indexes"] = [0, 3]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.ConvertError, match="fullatt_block_indexes"):
        convert.convert(str(bad), str(tmp_path / "x.gguf"), "f32", progress=False)
    cfg["vision_config"]["fullatt_block_indexes"] = [1, 3]
    cfg["text_config"]["rope_parameters"].pop("mrope_section")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.ConvertError, match="mrope_section"):
        convert.convert(str(bad), str(tmp_path / "x.gguf"), "f32", progress=False)
    assert not (tmp_path / "x.gguf").exists()
