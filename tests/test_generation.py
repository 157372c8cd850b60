"""Sampling, stop strings, streaming and chat templates."""
from __future__ import annotations

import numpy as np
import pytest

import x2l_edge
from x2l_edge import _core
from x2l_edge.generation import held_suffix as _held_suffix, utf8_split as _utf8_split


def _sample_many(n, logits, **kw):
    counts = np.zeros(len(logits), dtype=np.int64)
    s = _core.Sampler(**kw)
    for _ in range(n):
        counts[s.sample(np.asarray(logits, dtype=np.float32))] += 1
    return counts


def test_greedy_and_top_k_1():
    logits = np.array([0.1, 2.0, -1.0, 1.9], dtype=np.float32)
    assert _core.Sampler().sample(logits) == 1
    assert (_sample_many(200, logits, temperature=1.5, top_k=1, seed=3)[1]) == 200


def test_temperature_distribution_matches_softmax():
    logits = np.array([1.0, 0.0, -1.0, 0.5], dtype=np.float32)
    t = 0.7
    p = np.exp(logits / t)
    p /= p.sum()
    n = 20000
    counts = _sample_many(n, logits, temperature=t, seed=1)
    # Each frequency within 4 standard deviations of its expectation.
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4 * sd), (counts, n * p)


def test_top_p_and_min_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    c = _sample_many(3000, logits, temperature=1.0, top_p=0.75, seed=2)
    assert c[2] == 0 and c[3] == 0 and c[0] > 0 and c[1] > 0  # 0.5 + 0.3 reaches 0.75
    c = _sample_many(3000, logits, temperature=1.0, min_p=0.35, seed=2)
    assert c[2] == 0 and c[3] == 0 and c[1] > 0  # 0.15 < 0.35 * 0.5
    c = _sample_many(3000, logits, temperature=1.0, top_k=3, seed=2)
    assert c[3] == 0 and c[2] > 0


def test_seed_reproducible_and_varies():
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    a = [_core.Sampler(temperature=1.0, seed=42).sample(logits) for _ in range(1)]
    s1, s2, s3 = (_core.Sampler(temperature=1.0, seed=k) for k in (42, 42, 43))
    seq1 = [s1.sample(logits) for _ in range(50)]
    seq2 = [s2.sample(logits) for _ in range(50)]
    seq3 = [s3.sample(logits) for _ in range(50)]
    assert seq1 == seq2 and seq1 != seq3 and a[0] == seq1[0]


def test_repetition_penalty():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    s = _core.Sampler(repeat_penalty=1.2)
    assert s.sample(logits, [0]) == 1  # 2.0 / 1.2 < 1.9
    assert _core.Sampler(repeat_penalty=1.2, repeat_last_n=1).sample(logits, [0, 2]) == 0  # only the last token


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                dict(repeat_penalty=0.0), dict(repeat_last_n=-1)])
def test_invalid_sampler_params(kw):
    with pytest.raises(x2l_edge.Error):
        _core.Sampler(**kw)


def test_utf8_split_and_stop_holding():
    euro = "€".encode()
    assert _utf8_split(b"ab" + euro[:2]) == ("ab", euro[:2])
    assert _utf8_split(euro) == ("€", b"")
    assert _held_suffix("hello <|e", ["<|end|>"]) == 3
    assert _held_suffix("hello", ["<|end|>"]) == 0


@pytest.fixture(scope="module")
def tiny_session(tiny_gguf):
    return x2l_edge.Session(tiny_gguf("qwen2", "f32"), n_threads=2, kv_type="f32")


def test_stream_equals_full_and_max_tokens(tiny_session):
    s = tiny_session
    full = s.generate("the cat jumps", max_tokens=20)
    pieces = list(s.generate("the cat jumps", max_tokens=20, stream=True))
    assert "".join(pieces) == full
    assert len(pieces) >= 2
    ids = list(s.generate_ids(s.tokenize("the cat jumps"), max_tokens=7, stop_ids=[]))
    assert len(ids) == 7
    assert s.generate("the cat", max_tokens=0) == ""


def test_stop_strings_cut_output(tiny_session):
    s = tiny_session
    full = s.generate("the model reads", max_tokens=30)
    assert len(full) > 6
    stop = full[3:6]
    cut = s.generate("the model reads", max_tokens=30, stop=[stop])
    assert cut == full[:full.index(stop)]
    assert "".join(s.generate("the model reads", max_tokens=30, stop=stop, stream=True)) == cut


def test_sampled_generation_is_seeded(tiny_session):
    s = tiny_session
    a = s.generate("people walk", max_tokens=15, temperature=1.0, seed=7)
    b = s.generate("people walk", max_tokens=15, temperature=1.0, seed=7)
    assert a == b


def test_prefix_reuse_gives_same_answer(tiny_gguf):
    s = x2l_edge.Session(tiny_gguf("llama", "f32"), n_threads=2, kv_type="f32")
    first = s.generate("the model reads a long video", max_tokens=10)
    s.generate("the model reads something else entirely", max_tokens=3)
    again = s.generate("the model reads a long video", max_tokens=10)  # reuses "the model reads"
    fresh = x2l_edge.Session(tiny_gguf("llama", "f32"), n_threads=2, kv_type="f32")
    assert again == first == fresh.generate("the model reads a long video", max_tokens=10)


def test_chat_template_rendering(tiny_session):
    s = tiny_session
    p = s.chat_prompt([{"role": "user", "content": "hi"}], system="be brief")
    assert p == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = s.tokenize(p)
    im_start = s.tokenize("<|im_start|>")
    assert len(im_start) == 1 and ids.count(im_start[0]) == 3
    with pytest.raises(ValueError):
        s.chat_prompt([{"content": "no role"}])
    with pytest.raises(ValueError):
        s.chat_prompt([])


def test_chat_stops_at_im_end(tiny_session):
    s = tiny_session
    out = s.chat("the cat", max_tokens=40)
    assert "<|im_end|>" not in out


def test_smollm2_template_and_tokenize_roundtrip(smollm2_path):
    s = x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=256)
    p = s.chat_prompt("Hello!")
    assert p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n")
    text = "Héllo wörld 🙂 123456 <|im_end|>\n\tdef f(x): return x**2"
    assert s.detokenize(s.tokenize(text)) == text
    info = s.info
    assert info["arch"] == "llama" and info["n_layer"] == 30 and info["n_head_kv"] == 3
    mem = s.memory()
    assert 90e6 < mem["weights_bytes"] < 110e6 and mem["kv_bytes"] > 0
