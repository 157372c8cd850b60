"""Video QA end to end: LLaVA-OneVision logits against transformers, full-KV vs X²L, errors."""
from __future__ import annotations

import numpy as np
import pytest

import x2l_edge


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    import convert
    import tiny_models

    d = tmp_path_factory.mktemp("llava")
    hf = tiny_models.make_tiny_llava_onevision(d / "hf", seed=3)
    path = d / "m.gguf"
    convert.convert(str(hf), str(path), "f32", progress=False)
    return hf, str(path)


def _frames(n, size=70, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)


def test_llava_onevision_logits_match_transformers(llava):
    """Same pixel tensors into transformers' LlavaOnevisionForConditionalGeneration and into our
    vision tower + projector + pooling + newline + LLM: the logits of the multimodal prompt agree."""
    import torch
    import transformers

    hf_dir, path = llava
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    s = x2l_edge.Session(path, n_threads=2, kv_type="f32", n_ctx=512)
    pixels = np.stack([s.preprocessor(f) for f in _frames(3)])  # [F, 3, S, S]
    feats = s.encode_frames(pixels)
    tpf = s.vision.tokens_per_frame
    newline = np.asarray(s.vision.image_newline, dtype=np.float32)[None]
    embd = np.concatenate([feats, newline])
    assert embd.shape[0] == 3 * tpf + 1

    prefix = s.tokenize("<|im_start|>user\n")
    suffix = s.tokenize("\nwhat happens in the scene?<|im_end|>\n<|im_start|>assistant\n")
    vid = model.config.video_token_index
    ids = torch.tensor([prefix + [vid] * embd.shape[0] + suffix])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values_videos=torch.from_numpy(pixels)[None]).logits[0].numpy()

    s._s.eval(prefix)
    mid = s._s.eval_embd(embd, all_logits=True)
    tail = s._s.eval(suffix, all_logits=True)
    ours = np.concatenate([mid, tail])
    ref = ref[len(prefix):]
    err = np.abs(ours - ref).max() / ref.std()
    assert err < 1e-4, err


def test_ask_full_and_x2l_on_a_video_file(llava, tmp_path):
    from x2l_edge.video import write_video

    _, path = llava
    video = tmp_path / "clip.avi"
    write_video(str(video), list(_frames(12, size=96, seed=1)), fps=4, codec="MJPG")
    s = x2l_edge.Session(path, n_threads=2, kv_type="f32", n_ctx=1024)
    q = "what happens?"
    full = s.ask(str(video), q, mode="full", max_frames=8, chunk_frames=2, max_tokens=6)
    assert isinstance(full, str)
    # With ratio 1 the X²L cache holds every visual token: identical answer to the full-KV baseline.
    exact = s.ask(str(video), q, mode="x2l", max_frames=8, chunk_frames=2, max_tokens=6, ratio_low=1, ratio_high=1,
                  low_type="f32", high_type="f32", top_k=4)
    assert exact == full
    ctx = s.prefill(str(video), max_frames=8, chunk_frames=2, ratio_low=2, ratio_high=8, high_type="f16")  # head_dim 16
    assert ctx.n_chunks == 4
    info = [ctx.chunk_info(c) for c in range(4)]
    tpf = s.vision.tokens_per_frame
    assert [i["tok_end"] - i["tok_begin"] for i in info] == [2 * tpf] * 3 + [2 * tpf + 1]  # newline at the end
    assert all(i["n_frames"] == 2 for i in info)
    assert isinstance(ctx.ask(q, top_k=1, max_tokens=4), str)
    assert len(ctx.scores(q, "embedding")) == 4


def test_video_errors(llava, tiny_gguf, tmp_path):
    _, path = llava
    s = x2l_edge.Session(path, n_threads=1, n_ctx=256)
    with pytest.raises(FileNotFoundError):
        s.ask(str(tmp_path / "missing.mp4"), "q?")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ValueError):
        s.ask(str(bad), "q?")
    with pytest.raises(ValueError):
        s.ask(np.zeros((0, 70, 70, 3), dtype=np.uint8), "q?")
    with pytest.raises(ValueError):
        s.ask(np.zeros((2, 70, 70), dtype=np.uint8), "q?")  # grayscale
    text_only = x2l_edge.Session(tiny_gguf("qwen2", "f32"), n_threads=1)
    with pytest.raises(ValueError, match="no vision encoder"):
        text_only.ask(_frames(2), "q?")
    with pytest.raises(ValueError):
        s.ask(_frames(2), "q?", mode="fast")


def test_cli_ask(llava, tmp_path, capsys):
    from x2l_edge import cli
    from x2l_edge.video import write_video

    _, path = llava
    video = tmp_path / "v.avi"
    write_video(str(video), list(_frames(6, size=80, seed=2)), fps=2, codec="MJPG")
    rc = cli.main(["ask", path, str(video), "what is shown?", "--max-frames", "4", "--chunk-frames", "2",
                   "--top-k", "1", "-n", "4", "-t", "1", "--scorer", "embedding"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "L reloaded for" in out.err and "2 chunks" in out.err  # no bars: stderr is not a terminal here
    assert cli.main(["ask", path, str(tmp_path / "nope.mp4"), "q?"]) == 2
