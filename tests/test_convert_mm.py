"""tools/convert.py on multimodal checkpoints: LLaVA-OneVision and Video-XL (tiny random, built offline).

Checked against docs/gguf_layout.md: tensor names, shapes, GGML types and values (dequantized
vs the HF tensors), metadata keys (vision, preprocessing, pooling, VST, X²L defaults), the
tokenizer and chat template, the accepted tensor-name layouts, errors, and, end to end, that
the vision features computed *only from the GGUF* (tensors + keys, following the layout doc)
equal those of transformers' LLaVA-OneVision and of a Video-XL reference built from the HF
tensors.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

import convert as cv  # noqa: E402
from tiny_models import (CLIP_MEAN, CLIP_STD, LLAVA_OV_TEMPLATE, QWEN2_INSTRUCT_TEMPLATE, SPECIAL_TOKENS,  # noqa: E402
                         make_tiny_llava_onevision, make_tiny_qwen2, make_tiny_videoxl)

Q = gguf.GGMLQuantizationType
OUTTYPE_Q = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
_FP16 = 2.0 ** -11
QUANT_BOUND = {Q.Q8_0: (0.5 / 127 + _FP16) * 1.001, Q.Q4_0: (1 / 8 + _FP16) * 1.001}

OV_SEED, VXL_SEED = 3, 4
VXL_TOWER = "model.vision_tower.vision_tower.vision_model."


# ----------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def mm(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mm_hf")
    return {"ov": make_tiny_llava_onevision(base / "ov", seed=OV_SEED),
            "vxl": make_tiny_videoxl(base / "vxl", seed=VXL_SEED)}


@pytest.fixture(scope="session")
def conv(mm, tmp_path_factory):
    """conv(kind, outtype) -> GGUF path, converted once per session."""
    out_dir, cache = tmp_path_factory.mktemp("mm_gguf"), {}

    def get(kind: str, outtype: str) -> Path:
        if (kind, outtype) not in cache:
            cache[kind, outtype] = cv.convert(mm[kind], out_dir / f"{kind}-{outtype}.gguf", outtype, progress=False)
        return cache[kind, outtype]
    return get


def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def gguf_values(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))


def read(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    return fields(r), {t.name: t for t in r.tensors}


def check_close(name: str, got: np.ndarray, want: np.ndarray, qtype) -> None:
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == Q.F16:
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    elif qtype == Q.BF16:
        np.testing.assert_array_equal(got, torch.from_numpy(want).bfloat16().float().numpy(), err_msg=name)
    else:
        err = np.abs(got - want).reshape(-1, 32).max(axis=1) / np.abs(want).reshape(-1, 32).max(axis=1)
        assert err.max() <= QUANT_BOUND[qtype], f"{name}: block error {err.max():.4f} x amax"


_LLM = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        "vst_q": "self_attn.beacon_q_proj", "vst_k": "self_attn.beacon_k_proj", "vst_v": "self_attn.beacon_v_proj"}
_VIS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1",
        "ffn_down": "mlp.fc2"}
_VIS_TOP = {"v.patch_embd.weight": "embeddings.patch_embedding.weight",
            "v.patch_embd.bias": "embeddings.patch_embedding.bias",
            "v.class_embd": "embeddings.class_embedding",
            "v.position_embd.weight": "embeddings.position_embedding.weight",
            "v.pre_ln.weight": "pre_layrnorm.weight", "v.pre_ln.bias": "pre_layrnorm.bias",
            "v.post_ln.weight": "post_layernorm.weight", "v.post_ln.bias": "post_layernorm.bias"}


def hf_name(kind: str, name: str) -> str:
    """Where a GGUF tensor comes from, in the tiny checkpoint (transformers-5 saved names for OV)."""
    llm, head, tower = (("language_model.model.", "language_model.lm_head.weight", "vision_tower.") if kind == "ov"
                        else ("model.", "lm_head.weight", VXL_TOWER))
    if name.startswith("v.blk."):
        _, _, i, part, what = name.split(".")
        return f"{tower}encoder.layers.{i}.{_VIS[part]}.{what}"
    if name.startswith("blk."):
        _, i, part, what = name.split(".")
        return f"{llm}layers.{i}.{_LLM[part]}.{what}"
    if name in _VIS_TOP:
        return tower + _VIS_TOP[name]
    proj = ({"mm.0": "multi_modal_projector.linear_1", "mm.2": "multi_modal_projector.linear_2"} if kind == "ov"
            else {"mm.0": "model.mm_projector.0", "mm.2": "model.mm_projector.2"})
    if name[:4] in proj:
        return proj[name[:4]] + name[4:]
    return {"token_embd.weight": f"{llm}embed_tokens.weight", "output_norm.weight": f"{llm}norm.weight",
            "output.weight": head, "mm.image_newline": "image_newline",
            "vst_embd.weight": "model.beacon_embed_tokens.weight"}[name]


def expected_names(kind: str, n_vision_layers: int) -> set[str]:
    llm = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
           "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
           "attn_q.bias", "attn_k.bias", "attn_v.bias"]
    if kind == "vxl":
        llm += [f"vst_{k}.{w}" for k in "qkv" for w in ("weight", "bias")]
    names = {f"blk.{i}.{n}" for i in range(2) for n in llm} | {"token_embd.weight", "output_norm.weight"}
    names |= {f"v.blk.{i}.{p}.{w}" for i in range(n_vision_layers) for p in _VIS for w in ("weight", "bias")}
    names |= {"v.patch_embd.weight", "v.position_embd.weight", "v.post_ln.weight", "v.post_ln.bias",
              "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"}
    if kind == "ov":  # tied LM head, SigLIP conv bias, newline
        names |= {"v.patch_embd.bias", "mm.image_newline"}
    else:  # untied head, CLIP CLS + pre-LN, VST embedding
        names |= {"output.weight", "v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias", "vst_embd.weight"}
    return names


def expected_type(name: str, ndim: int, outtype: str):
    if name in ("v.position_embd.weight", "v.class_embd", "vst_embd.weight") or ndim == 1:
        return Q.F32
    if name == "v.patch_embd.weight":
        return Q.F32 if outtype == "f32" else Q.F16
    return OUTTYPE_Q[outtype]  # every tiny row length is a multiple of 32


def copy_model(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "hf"))


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def drop_tensors(hf: Path, pred) -> list[str]:
    from safetensors.torch import load_file, save_file

    sd = load_file(hf / "model.safetensors")
    gone = [k for k in sd if pred(k)]
    assert gone, "nothing matched"
    save_file({k: v for k, v in sd.items() if k not in gone}, hf / "model.safetensors", metadata={"format": "pt"})
    return gone


def assert_convert_error(hf: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(cv.ConvertError) as e:
        cv.convert(hf, out, "f16", progress=False)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert not out.exists()


# ----------------------------------------------------------------------------- the vision path, from the GGUF alone

def gguf_video_features(path: Path, pixels: torch.Tensor) -> torch.Tensor:
    """Frames [F, 3, H, W] (already normalised) -> the LLM input rows, using only what the GGUF says.

    A direct transcription of docs/gguf_layout.md: what the C++ vision encoder must compute.
    """
    kv, ts = read(path)
    T = {n: torch.from_numpy(gguf_values(t).copy()) for n, t in ts.items()}
    kind, p = kv["x2l.vision.kind"], kv["clip.vision.patch_size"]
    W, nh, eps = kv["clip.vision.embedding_length"], kv["clip.vision.attention.head_count"], \
        kv["clip.vision.attention.layer_norm_epsilon"]
    act = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
           "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}[kv["x2l.vision.act"]]
    n = pixels.shape[0]

    def lin(x, name):
        return F.linear(x, T[name + ".weight"], T[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (W,), T[name + ".weight"], T[name + ".bias"], eps)

    x = F.conv2d(pixels, T["v.patch_embd.weight"], T.get("v.patch_embd.bias"), stride=p).flatten(2).transpose(1, 2)
    if kind == "clip":
        x = torch.cat([T["v.class_embd"].expand(n, 1, W), x], dim=1)
    x = x + T["v.position_embd.weight"]
    if kind == "clip":
        x = ln(x, "v.pre_ln")
    states = [x]
    for i in range(kv["clip.vision.block_count"]):
        b = f"v.blk.{i}."
        h = ln(x, b + "ln1")
        q, k, v = (lin(h, b + a).view(n, -1, nh, W // nh).transpose(1, 2) for a in ("attn_q", "attn_k", "attn_v"))
        x = x + lin(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, W), b + "attn_out")
        x = x + lin(act(lin(ln(x, b + "ln2"), b + "ffn_up")), b + "ffn_down")
        states.append(x)
    feat = states[kv["x2l.vision.select_layer"]]
    if kind == "clip" and kv["x2l.vision.drop_cls"]:
        feat = feat[:, 1:]
    assert kv["clip.projector_type"] == "mlp" and kv["x2l.pool.after_projector"]
    feat = lin(F.gelu(lin(feat, "mm.0")), "mm.2")
    g, s, C = kv["clip.vision.image_size"] // p, kv["x2l.pool.stride"], feat.shape[-1]
    grid = feat.reshape(n, g, g, C).permute(0, 3, 1, 2)
    if kv["x2l.pool.mode"] == "bilinear":
        grid = F.interpolate(grid, size=(math.ceil(g / s), math.ceil(g / s)), mode="bilinear", align_corners=False)
    elif kv["x2l.pool.mode"] == "avg":
        grid = F.avg_pool2d(grid, kernel_size=s, stride=s)
    tokens = grid.permute(0, 2, 3, 1).reshape(n, -1, C)
    assert tokens.shape[1] == kv["x2l.tokens_per_frame"]
    out = tokens.reshape(-1, C)
    if kv["x2l.video.newline"] == "end":
        out = torch.cat([out, T["mm.image_newline"][None]])
    return out


def assert_features_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    scale = want.abs().max().item()
    assert scale > 1e-3  # not trivially zero
    assert (got - want).abs().max().item() <= 2e-5 * max(scale, 1.0), (got - want).abs().max().item()


def frames(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("kind", ["ov", "vxl"])
def test_tensors_round_trip(kind, outtype, mm, conv):
    hf = hf_tensors(mm[kind])
    _, ts = read(conv(kind, outtype))
    # OV: SigLIP 2 layers, select -1 -> both stored. Video-XL: CLIP 3 layers, select -2 -> 2 stored.
    assert set(ts) == expected_names(kind, 2)
    if kind == "ov":
        assert "language_model.lm_head.weight" not in hf  # tied: the checkpoint has no head
    else:
        assert f"{VXL_TOWER}encoder.layers.2.mlp.fc1.weight" in hf  # the dropped layer was there
    for name, t in ts.items():
        want = hf[hf_name(kind, name)]
        got = gguf_values(t)
        assert got.shape == want.shape, name
        assert t.tensor_type == expected_type(name, want.ndim, outtype), (name, t.tensor_type.name)
        check_close(name, got, want, t.tensor_type)


@pytest.mark.parametrize("kind", ["ov", "vxl"])
def test_bf16_and_q4_0(kind, mm, tmp_path):
    hf = hf_tensors(mm[kind])
    for outtype in ("bf16", "q4_0"):
        assert cv.main([str(mm[kind]), str(tmp_path / f"{outtype}.gguf"), "--outtype", outtype, "--quiet"]) == 0
        for name, t in read(tmp_path / f"{outtype}.gguf")[1].items():
            want = hf[hf_name(kind, name)]
            assert t.tensor_type == expected_type(name, want.ndim, outtype), name
            check_close(name, gguf_values(t), want, t.tensor_type)


def test_multimodal_conversion_streams(mm, tmp_path, monkeypatch):
    events = []
    real_load, real_write = cv.SafetensorsCheckpoint.load, gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(cv.SafetensorsCheckpoint, "load", lambda s, n: events.append("r") or real_load(s, n))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda s, t: events.append("w") or real_write(s, t))
    cv.convert(mm["vxl"], tmp_path / "m.gguf", "q8_0", progress=False)
    assert events == ["r", "w"] * (len(events) // 2) and len(events) == 2 * len(expected_names("vxl", 2))


# ----------------------------------------------------------------------------- metadata

def test_llava_onevision_metadata(mm, conv):
    cfg = json.loads((mm["ov"] / "config.json").read_text())
    kv, _ = read(conv("ov", "f32"))
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.embedding_length"] == 64 and kv["qwen2.block_count"] == 2
    assert kv["clip.has_vision_encoder"] is True
    assert kv["clip.projector_type"] == "mlp"
    assert kv["clip.vision.image_size"] == cfg["vision_config"]["image_size"] == 70
    assert kv["clip.vision.patch_size"] == 14
    assert kv["clip.vision.embedding_length"] == 32
    assert kv["clip.vision.feed_forward_length"] == 64
    assert kv["clip.vision.block_count"] == 2
    assert kv["clip.vision.attention.head_count"] == 2
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert kv["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    assert kv["clip.vision.image_std"] == pytest.approx([0.5] * 3)
    assert kv["x2l.model_kind"] == "llava_onevision"
    assert kv["x2l.vision.kind"] == "siglip"
    assert kv["x2l.vision.act"] == "gelu_tanh"
    assert kv["x2l.vision.select_layer"] == -1
    assert kv["x2l.vision.drop_cls"] is False
    assert kv["x2l.image.resize"] == "square"
    assert kv["x2l.image.resample"] == "bicubic"
    assert kv["x2l.pool.mode"] == "bilinear" and kv["x2l.pool.stride"] == 2
    assert kv["x2l.pool.after_projector"] is True
    assert kv["x2l.video.newline"] == "end"
    assert kv["x2l.tokens_per_frame"] == 9  # 5x5 grid -> ceil(5/2)^2
    assert kv["x2l.image_token_id"] == cfg["image_token_index"]
    assert kv["x2l.video_token_id"] == cfg["video_token_index"]
    assert kv["tokenizer.ggml.tokens"][cfg["image_token_index"]] == "<image>"
    assert kv["tokenizer.ggml.tokens"][cfg["video_token_index"]] == "<video>"
    for t in ("<image>", "<video>"):
        assert kv["tokenizer.ggml.token_type"][kv["tokenizer.ggml.tokens"].index(t)] == gguf.TokenType.CONTROL
    # The processor's template (chat_template.json) wins over tokenizer_config.json's text-only one.
    assert kv["tokenizer.chat_template"] == LLAVA_OV_TEMPLATE
    assert kv["x2l.chat_format"] == "chatml"
    assert "x2l.vst.param" not in kv


def test_videoxl_metadata(mm, conv):
    cfg = json.loads((mm["vxl"] / "config.json").read_text())
    kv, _ = read(conv("vxl", "f32"))
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert kv["x2l.model_kind"] == "videoxl"
    assert kv["clip.vision.image_size"] == 56 and kv["clip.vision.patch_size"] == 14
    assert kv["clip.vision.embedding_length"] == cfg["mm_hidden_size"] == 32
    assert kv["clip.vision.feed_forward_length"] == 64
    assert kv["clip.vision.attention.head_count"] == 2  # from the tower's config.json: not in the weights
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    # HF select -2 of 3 layers needs 2 layers; stored relative to them it is -1.
    assert cfg["mm_vision_select_layer"] == -2
    assert kv["clip.vision.block_count"] == 2 and kv["x2l.vision.select_layer"] == -1
    assert kv["x2l.vision.kind"] == "clip" and kv["x2l.vision.act"] == "quick_gelu"
    assert kv["x2l.vision.drop_cls"] is True
    assert kv["clip.vision.image_mean"] == pytest.approx(CLIP_MEAN)
    assert kv["clip.vision.image_std"] == pytest.approx(CLIP_STD)
    assert kv["x2l.image.resize"] == "shortest_center_crop" and kv["x2l.image.resample"] == "bicubic"
    assert kv["x2l.pool.mode"] == "avg" and kv["x2l.pool.stride"] == 2 and kv["x2l.pool.after_projector"] is True
    assert kv["x2l.video.newline"] == "none"
    assert kv["x2l.tokens_per_frame"] == 4  # 4x4 patches -> 2x2
    assert kv["x2l.image_token_id"] == -1 and kv["x2l.video_token_id"] == -1
    assert kv["x2l.vst.param"] == ["q", "k", "v"]
    assert kv["x2l.vst.window"] == 1440
    assert kv["x2l.vst.train_ratios"] == [2, 4, 8]
    assert kv["x2l.vst.accum"] is True


def test_videoxl_tokenizer_from_slow_files(mm, conv):
    """Video-XL ships vocab.json + merges.txt + added_tokens.json and no tokenizer.json."""
    hf = mm["vxl"]
    assert not (hf / "tokenizer.json").exists()
    cfg = json.loads((hf / "config.json").read_text())
    kv, _ = read(conv("vxl", "q8_0"))
    by_id = {i: t for t, i in json.loads((hf / "vocab.json").read_text()).items()}
    added = json.loads((hf / "added_tokens.json").read_text())
    by_id.update({i: t for t, i in added.items()})
    assert kv["tokenizer.ggml.tokens"] == [by_id.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])]
    merges = [m for m in (hf / "merges.txt").read_text().splitlines() if m and not m.startswith("#version")]
    assert kv["tokenizer.ggml.merges"] == merges
    assert kv["tokenizer.ggml.pre"] == "qwen2"
    for s in SPECIAL_TOKENS:
        assert kv["tokenizer.ggml.token_type"][added[s]] == gguf.TokenType.CONTROL
    assert kv["tokenizer.ggml.eos_token_id"] == added["<|im_end|>"] == cfg["eos_token_id"]
    assert kv["tokenizer.chat_template"] == QWEN2_INSTRUCT_TEMPLATE
    assert kv["x2l.chat_format"] == "chatml"


@pytest.mark.parametrize("kind", ["ov", "vxl", "text"])
def test_x2l_defaults_in_every_file(kind, mm, conv, tmp_path):
    if kind == "text":
        path = cv.convert(make_tiny_qwen2(tmp_path / "hf"), tmp_path / "t.gguf", "f16", progress=False)
    else:
        path = conv(kind, "f32")
    kv, _ = read(path)
    assert kv["x2l.model_kind"] == {"ov": "llava_onevision", "vxl": "videoxl", "text": "text"}[kind]
    ratio_low = 2 if kind == "vxl" else 1  # beacon tokens are trained for 2; training-free compressors keep L whole
    assert (kv["x2l.chunk_frames"], kv["x2l.ratio_low"], kv["x2l.ratio_high"], kv["x2l.top_k"]) == (10, ratio_low, 32, 3)
    assert kv["x2l.pin_ends"] is False
    assert ("x2l.frames_default" in kv) == (kind != "text")
    assert ("clip.has_vision_encoder" in kv) == (kind != "text")


# ----------------------------------------------------------------------------- naming schemes

@pytest.mark.parametrize("layout", ["hub", "state_dict"])
def test_llava_onevision_name_layouts(layout, mm, conv, tmp_path):
    """Hub (transformers 4: vision_tower.vision_model.*) and in-memory names give the identical file."""
    from safetensors import safe_open

    hf = make_tiny_llava_onevision(tmp_path / "hf", seed=OV_SEED, layout=layout)
    with safe_open(hf / "model.safetensors", "pt") as f:
        names = list(f.keys())
    marker = {"hub": "vision_tower.vision_model.embeddings.patch_embedding.weight",
              "state_dict": "model.language_model.embed_tokens.weight"}[layout]
    assert marker in names
    _, want = read(conv("ov", "f16"))
    _, got = read(cv.convert(hf, tmp_path / "m.gguf", "f16", progress=False))
    assert list(got) == list(want)
    for name in want:
        assert got[name].tensor_type == want[name].tensor_type, name
        np.testing.assert_array_equal(got[name].data, want[name].data, err_msg=name)


# ----------------------------------------------------------------------------- vision path end to end

@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_llava_onevision_features_match_transformers(feature_layer, mm, conv, tmp_path):
    if feature_layer == -1:
        hf, path = mm["ov"], conv("ov", "f32")
    else:
        hf = make_tiny_llava_onevision(tmp_path / "hf", seed=OV_SEED, vision_feature_layer=feature_layer)
        path = cv.convert(hf, tmp_path / "m.gguf", "f32", progress=False)
    kv, _ = read(path)
    assert kv["clip.vision.block_count"] == {-1: 2, -2: 1}[feature_layer] and kv["x2l.vision.select_layer"] == -1
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(hf).eval()
    pix = frames(3, 70)
    with torch.no_grad():
        want = model.model.get_video_features(pixel_values_videos=pix[None], vision_feature_layer=feature_layer,
                                              vision_feature_select_strategy="full").pooler_output[0]
        got = gguf_video_features(path, pix)
    assert want.shape == (3 * 9 + 1, 64)
    assert_features_close(got, want)


def videoxl_reference(hf: Path, pixels: torch.Tensor) -> torch.Tensor:
    """Video-XL's video path (VIDEOXL.md section 4) on the HF tensors, with transformers' CLIP."""
    cfg = json.loads((hf / "config.json").read_text())
    tower = json.loads((hf / cfg["mm_vision_tower"].rsplit("/", 1)[-1] / "config.json").read_text())["vision_config"]
    sd = {k: torch.from_numpy(v) for k, v in hf_tensors(hf).items()}
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**tower)).eval()
    clip.load_state_dict({k[len(VXL_TOWER):]: v for k, v in sd.items() if k.startswith(VXL_TOWER)})
    with torch.no_grad():
        feat = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][:, 1:]
        feat = F.linear(F.gelu(F.linear(feat, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
                        sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])
        n, g, s = pixels.shape[0], 4, cfg["mm_spatial_pool_stride"]
        feat = F.avg_pool2d(feat.view(n, g, g, -1).permute(0, 3, 1, 2), kernel_size=s, stride=s)
        return feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])


@pytest.mark.parametrize("select", [-2, -1, 1])
def test_videoxl_features_match_reference(select, mm, conv, tmp_path):
    if select == -2:
        hf, path = mm["vxl"], conv("vxl", "f32")
    else:
        hf = make_tiny_videoxl(tmp_path / "hf", seed=VXL_SEED, select_layer=select)
        path = cv.convert(hf, tmp_path / "m.gguf", "f32", progress=False)
    kv, _ = read(path)
    assert kv["clip.vision.block_count"] == {-2: 2, -1: 3, 1: 1}[select]
    pix = frames(2, 56, seed=1)
    want = videoxl_reference(hf, pix)
    assert want.shape == (2 * 4, 64)
    assert_features_close(gguf_video_features(path, pix), want)


# ----------------------------------------------------------------------------- options and warnings

def test_llava_onevision_processor_clip_mean_is_overridden(mm, tmp_path, capsys):
    """transformers 5's video processor defaults are CLIP's mean/std; SigLIP needs 0.5."""
    hf = copy_model(mm["ov"], tmp_path)
    edit_json(hf / "video_preprocessor_config.json", lambda c: c.update(image_mean=CLIP_MEAN, image_std=CLIP_STD))
    kv, _ = read(cv.convert(hf, tmp_path / "m.gguf", "f16", progress=False))
    assert kv["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    assert kv["clip.vision.image_std"] == pytest.approx([0.5] * 3)
    err = capsys.readouterr().err
    assert "video_preprocessor_config.json" in err and "image_mean" in err and "image_std" in err


def test_videoxl_beacon_param_missing_warns(mm, tmp_path, capsys):
    hf = copy_model(mm["vxl"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.pop("beacon_param"))
    kv, ts = read(cv.convert(hf, tmp_path / "m.gguf", "f16", progress=False))
    assert kv["x2l.vst.param"] == ["q", "k", "v"] and "blk.1.vst_v.bias" in ts
    assert "no beacon_param" in capsys.readouterr().err


def test_videoxl_ignores_rope_scaling(mm, tmp_path):
    """LlavaQwenForCausalLM forces rope_scaling=None, so a leftover entry must not matter."""
    hf = copy_model(mm["vxl"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}))
    kv, _ = read(cv.convert(hf, tmp_path / "m.gguf", "f16", progress=False))
    assert "qwen2.rope.scaling.type" not in kv


# ----------------------------------------------------------------------------- errors

def test_error_unknown_multimodal_architecture(mm, tmp_path):
    hf = copy_model(mm["ov"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(architectures=["LlavaNextVideoForConditionalGeneration"]))
    assert_convert_error(hf, tmp_path, "unsupported architecture LlavaNextVideoForConditionalGeneration",
                         "LlavaOnevisionForConditionalGeneration", "LlavaQwenForCausalLM")


def test_error_llava_onevision_missing_vision_tensor(mm, tmp_path):
    hf = copy_model(mm["ov"], tmp_path)
    drop_tensors(hf, lambda k: k == "vision_tower.encoder.layers.1.mlp.fc2.weight")
    assert_convert_error(hf, tmp_path, "missing vision tensor 'vision_tower.encoder.layers.1.mlp.fc2.weight'",
                         "v.blk.1.ffn_down.weight")


def test_error_llava_onevision_missing_newline(mm, tmp_path):
    hf = copy_model(mm["ov"], tmp_path)
    drop_tensors(hf, lambda k: k == "image_newline")
    assert_convert_error(hf, tmp_path, "'image_newline'", "mm.image_newline")


def test_error_llava_onevision_select_strategy(mm, tmp_path):
    hf = copy_model(mm["ov"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(vision_feature_select_strategy="default"))
    assert_convert_error(hf, tmp_path, "vision_feature_select_strategy 'default'")


def test_error_videoxl_missing_vision_tensor(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    drop_tensors(hf, lambda k: k == VXL_TOWER + "pre_layrnorm.weight")
    assert_convert_error(hf, tmp_path, f"missing vision tensor '{VXL_TOWER}pre_layrnorm.weight'", "v.pre_ln.weight")


def test_error_videoxl_missing_select_layer(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.pop("mm_vision_select_layer"))
    assert_convert_error(hf, tmp_path, "missing required key 'mm_vision_select_layer'")


def test_error_videoxl_select_layer_out_of_range(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.update(mm_vision_select_layer=-5))
    assert_convert_error(hf, tmp_path, "select layer -5 is out of range for a 3-layer tower")


def test_error_videoxl_missing_beacon_config_key(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    edit_json(hf / "config.json", lambda c: c.pop("beacon_accum"))
    assert_convert_error(hf, tmp_path, "missing required key 'beacon_accum'")


def test_error_videoxl_beacon_param_mismatch(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    drop_tensors(hf, lambda k: ".beacon_v_proj." in k)
    assert_convert_error(hf, tmp_path, "beacon_param ['q', 'k', 'v']", "['k', 'q']")


def test_error_videoxl_partial_beacon(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    drop_tensors(hf, lambda k: k == "model.layers.1.self_attn.beacon_k_proj.bias")
    assert_convert_error(hf, tmp_path, "missing beacon tensor 'model.layers.1.self_attn.beacon_k_proj.bias'")


def test_error_videoxl_without_beacon(tmp_path):
    hf = make_tiny_videoxl(tmp_path / "hf", seed=VXL_SEED, beacon=False)
    assert_convert_error(hf, tmp_path, "no beacon (VST) projections")


def test_error_videoxl_tower_config_not_found(mm, tmp_path):
    hf = copy_model(mm["vxl"], tmp_path)
    shutil.rmtree(hf / "clip-vit-tiny-patch14-56")
    assert_convert_error(hf, tmp_path, "cannot find the vision tower's config", "clip-vit-tiny-patch14-56")


def test_error_videoxl_known_tower_does_not_fit(mm, tmp_path):
    """A known tower name supplies the head count, but only if the weights really are that tower."""
    hf = copy_model(mm["vxl"], tmp_path)
    shutil.rmtree(hf / "clip-vit-tiny-patch14-56")
    edit_json(hf / "config.json", lambda c: c.update(mm_vision_tower="/share/models/clip-vit-large-patch14-336"))
    assert_convert_error(hf, tmp_path, "known tower clip-vit-large-patch14-336 has hidden_size=1024",
                         "vision tensors give 32")
