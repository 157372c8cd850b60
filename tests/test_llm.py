"""LLM forward pass against transformers on tiny random models, and on the real SmolLM2 weights."""
from __future__ import annotations

import numpy as np
import pytest

import x2l_edge
from x2l_edge import _core

# Max |logit difference| / std(reference logits), per weight type. f32 is exact up to summation
# order; f16 adds weight rounding; q8_0 and q4_0 add weight quantization plus Q8 activations.
TOL = {"f32": 2e-4, "f16": 5e-3, "q8_0": 4e-2, "q4_0": 0.25}
PROMPT_IDS = [5, 17, 42, 99, 3, 250, 77, 12, 300, 8, 64, 128, 9, 31, 200, 150, 2, 11]


def _hf_logits(hf_dir, ids):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.std(ref))


@pytest.fixture(scope="module")
def hf_ref(tiny_hf):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = _hf_logits(tiny_hf[arch], PROMPT_IDS)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_logits_match_transformers(arch, outtype, tiny_gguf, hf_ref):
    ref, _ = hf_ref(arch)
    s = x2l_edge.Session(tiny_gguf(arch, outtype), n_threads=2, kv_type="f32")
    ours = s.eval(PROMPT_IDS, all_logits=True)
    assert ours.shape == ref.shape
    err = _rel_err(ours, ref)
    assert err < TOL[outtype], f"{arch}/{outtype}: max|diff|/std = {err:.2e}"
    # Argmax agrees everywhere for the lossless types.
    if outtype in ("f32", "f16"):
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_greedy_continuation_identical(arch, outtype, tiny_gguf, hf_ref):
    import torch

    _, model = hf_ref(arch)
    prompt = PROMPT_IDS[:6]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    ref_new = out[0, len(prompt):].tolist()
    s = x2l_edge.Session(tiny_gguf(arch, outtype), n_threads=2, kv_type="f32")
    ours = list(s.generate_ids(prompt, max_tokens=24, stop_ids=[]))
    assert ours == ref_new


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_incremental_equals_batched(arch, tiny_gguf):
    path = tiny_gguf(arch, "f32")
    a = x2l_edge.Session(path, n_threads=2, kv_type="f32")
    full = a.eval(PROMPT_IDS, all_logits=True)
    b = x2l_edge.Session(path, n_threads=1, kv_type="f32", n_batch=5)  # uneven batches, one thread
    rows = []
    for i, t in enumerate(PROMPT_IDS):
        b.eval([t])
        rows.append(b.logits())
    np.testing.assert_allclose(np.stack(rows), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_type,tol", [("f16", 5e-3), ("q8_0", 5e-2), ("q4_0", 0.3)])
def test_kv_cache_types(kv_type, tol, tiny_hf, tmp_path):
    # q8_0/q4_0 KV rows need head_dim % 32 == 0: 2 heads of 32.
    import convert
    import tiny_models

    hf = tiny_models.make_tiny_qwen2(tmp_path / "hf", seed=3, num_attention_heads=2, num_key_value_heads=1)
    path = str(tmp_path / "m.gguf")
    convert.convert(str(hf), path, "f32", progress=False)
    ref, _ = _hf_logits(hf, PROMPT_IDS)
    s = x2l_edge.Session(path, n_threads=2, kv_type=kv_type)
    ours = s.eval(PROMPT_IDS, all_logits=True)
    assert _rel_err(ours, ref) < tol
    assert s.memory()["kv_bytes"] > 0


def test_context_overflow_and_bad_tokens(tiny_gguf):
    s = x2l_edge.Session(tiny_gguf("llama", "f32"), n_threads=1, n_ctx=16)
    with pytest.raises(x2l_edge.BudgetError):
        s.eval(list(range(1, 20)))
    assert s._s.n_past == 0  # a failed eval leaves the context unchanged
    with pytest.raises(x2l_edge.Error):
        s.eval([10**6])
    with pytest.raises(x2l_edge.Error):
        s.eval([-1])
    s.eval([1, 2, 3])
    assert s._s.n_past == 3


def test_bad_arguments(tiny_gguf):
    with pytest.raises(FileNotFoundError):
        x2l_edge.Session("/nonexistent/model.gguf")
    with pytest.raises(x2l_edge.Error):
        x2l_edge.Session(tiny_gguf("llama", "f32"), kv_type="q3")
    with pytest.raises(ValueError):
        x2l_edge.Session(tiny_gguf("llama", "f32"), n_threads=-1)


# ---------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def smollm2_session(smollm2_path):
    return x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=512)


def test_smollm2_logits_vs_dequantized_reference(smollm2_path, smollm2_session):
    """Our Q4_1 kernels (Q8_1 activations) vs a float forward on the same weights dequantized by
    transformers' own GGUF loader: an independent implementation of model and dequantization."""
    import os

    import torch
    import transformers

    d, name = os.path.split(smollm2_path)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    ref_model.eval()
    s = smollm2_session
    ids = s.tokenize("<|im_start|>user\nName three colors of the rainbow.<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    s.reset()
    ours = s.eval(ids, all_logits=True)
    err = _rel_err(ours, ref)
    corr = np.corrcoef(ours[-1], ref[-1])[0, 1]
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert corr > 0.995, corr
    assert top1 >= 0.85, top1
    assert err < 0.35, err


def test_smollm2_chat_answer(smollm2_session):
    s = smollm2_session
    answer = s.chat("What is the capital of France?", max_tokens=32)
    assert "Paris" in answer, answer
    words = answer.split()
    assert len(words) >= 3 and all(w.isascii() for w in words), answer
