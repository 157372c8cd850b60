"""Vision encoders (cpp/vision/vision.cpp) against transformers on tiny random models.

LLaVA-OneVision: SiglipVisionModel -> hidden_states[vision_feature_layer] -> projector ->
bilinear pooling, exactly as LlavaOnevisionModel.get_video_features / apply_pooling do.
Video-XL: CLIPVisionModel -> hidden_states[mm_vision_select_layer][:, 1:] -> mlp2x_gelu ->
avg_pool2d(2) (no transformers class exists, so the reference is assembled from its parts).

GGUF files come from tools/convert.py on the tiny builders in tests/tiny_models.py. Two kinds of
reference:
  - "hf": the checkpoint's own float32 weights. For f32 GGUFs the runtime must match it to ~1e-6.
  - "gguf": the same model with every weight replaced by the GGUF's dequantized value. This
    removes weight rounding from the comparison, so f16 files must still match to ~1e-6, and
    q8_0 files only differ by the runtime's Q8_0 activation quantization (as llama.cpp does).
Errors are max|got - want| / max|want| over the whole output.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import convert  # noqa: E402  (tools/ is on sys.path through conftest)
import tiny_models  # noqa: E402
from x2l_edge import _core  # noqa: E402

F = torch.nn.functional

# Bounds on the relative max error (see the module docstring). Measured on these models:
# f32/f16 <1e-6, q8_0 (activations quantized to 8 bits at every matmul) <2e-2.
TOL_EXACT = 1e-4
TOL_Q8_0 = 5e-2
TOL_F16_VS_F32 = 5e-3  # f16 file against the float32 checkpoint (weight rounding only; measured <1e-3)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def pixels(n_frames: int, size: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(n_frames, 3, size, size, generator=g)).numpy()


# ----------------------------------------------------------------------------- references

# GGUF name -> HF name relative to the vision tower.
def _tower_name(g: str) -> str | None:
    fixed = {"v.patch_embd.weight": "embeddings.patch_embedding.weight",
             "v.patch_embd.bias": "embeddings.patch_embedding.bias",
             "v.class_embd": "embeddings.class_embedding",
             "v.position_embd.weight": "embeddings.position_embedding.weight",
             "v.pre_ln.weight": "pre_layrnorm.weight", "v.pre_ln.bias": "pre_layrnorm.bias",
             "v.post_ln.weight": "post_layernorm.weight", "v.post_ln.bias": "post_layernorm.bias"}
    if g in fixed:
        return fixed[g]
    if g.startswith("v.blk."):
        _, _, n, part, kind = g.split(".")
        hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
              "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}[part]
        return f"encoder.layers.{n}.{hf}.{kind}"
    return None


def _gguf_weights(path) -> dict[str, np.ndarray]:
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith(("v.", "mm.")):
            out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    return out


def _load_into(params: dict, name: str, value: np.ndarray) -> None:
    p = params[name]
    with torch.no_grad():
        p.copy_(torch.from_numpy(np.array(value).reshape(tuple(p.shape))))


class Reference:
    """features / projected / pooled of a float32 PyTorch model, [F * rows, C] like the runtime."""

    def __init__(self, tower, projector, pool, select: int, drop_cls: bool, grid: int):
        self.tower, self.projector, self.pool = tower.eval(), projector.eval(), pool
        self.select, self.drop_cls, self.grid = select, drop_cls, grid

    @torch.no_grad()
    def run(self, px: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(px)
        hs = self.tower(x, output_hidden_states=True).hidden_states[self.select]
        if self.drop_cls:
            hs = hs[:, 1:]
        proj = self.projector(hs)
        pooled = self.pool(proj, self.grid)
        flat = lambda t: t.reshape(-1, t.shape[-1]).numpy()  # noqa: E731
        return {"features": flat(hs), "projected": flat(proj), "pooled": flat(pooled)}

    def load_gguf(self, path) -> "Reference":
        """Replace every weight by the GGUF's (dequantized) value."""
        tower = dict(self.tower.named_parameters())
        tower_prefix = next(k for k in tower if k.endswith("embeddings.patch_embedding.weight"))[
            : -len("embeddings.patch_embedding.weight")]
        proj = dict(self.projector.named_parameters())
        proj_names = sorted({k.rsplit(".", 1)[0] for k in proj})  # first and second linear layers
        seen = set()
        for g, value in _gguf_weights(path).items():
            if g.startswith("mm."):
                if g == "mm.image_newline":
                    continue
                idx, kind = g.split(".")[1:]
                name = f"{proj_names[0 if idx == '0' else 1]}.{kind}"
                _load_into(proj, name, value)
            else:
                name = tower_prefix + _tower_name(g)
                _load_into(tower, name, value)
            seen.add(name)
        n_layers = sum(1 for g in _gguf_weights(path) if g.endswith("ln1.weight"))
        layer_names = {k for k in tower if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) < n_layers}
        missing = (layer_names | set(proj)) - seen
        assert not missing, f"reference weights not taken from the GGUF: {sorted(missing)}"
        return self


def _bilinear_pool(x: torch.Tensor, g: int) -> torch.Tensor:
    # LlavaOnevisionModel.apply_pooling
    n, _, c = x.shape
    x = x.view(n, g, g, c).permute(0, 3, 1, 2).contiguous()
    x = F.interpolate(x, size=[math.ceil(g / 2), math.ceil(g / 2)], mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(n, -1, c)


def _avg_pool(x: torch.Tensor, g: int) -> torch.Tensor:
    # Video-XL get_2dPool: avg_pool2d(kernel = stride = 2) after the projector
    n, _, c = x.shape
    x = x.view(n, g, g, c).permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, 2)
    return x.permute(0, 2, 3, 1).reshape(n, -1, c)


def onevision_reference(hf_dir: Path):
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ref = Reference(model.model.vision_tower, model.model.multi_modal_projector, _bilinear_pool,
                    cfg.vision_feature_layer, cfg.vision_feature_select_strategy == "default", g)
    return ref, model


def videoxl_reference(hf_dir: Path) -> Reference:
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tower_dir = hf_dir / config["mm_vision_tower"].rstrip("/").rsplit("/", 1)[-1]
    vc = json.loads((tower_dir / "config.json").read_text())["vision_config"]
    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vc)).eval()
    sd = load_file(hf_dir / "model.safetensors")
    pre = "model.vision_tower.vision_tower.vision_model."
    want = tower.state_dict()
    # transformers 5 names CLIPVisionModel parameters without "vision_model."; older ones with it.
    tp = "vision_model." if next(iter(want)).startswith("vision_model.") else ""
    tower.load_state_dict({tp + k[len(pre):]: v.float() for k, v in sd.items() if k.startswith(pre)}, strict=True)
    width, n_embd = vc["hidden_size"], sd["model.mm_projector.0.weight"].shape[0]
    proj = torch.nn.Sequential(torch.nn.Linear(width, n_embd), torch.nn.GELU(), torch.nn.Linear(n_embd, n_embd))
    proj.load_state_dict({k[len("model.mm_projector."):]: v.float() for k, v in sd.items()
                          if k.startswith("model.mm_projector.")})
    g = vc["image_size"] // vc["patch_size"]
    return Reference(tower, proj, _avg_pool, config["mm_vision_select_layer"], True, g)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    base = tmp_path_factory.mktemp("vision_hf")
    return {
        "ov": tiny_models.make_tiny_llava_onevision(base / "ov", seed=11),
        "xl": tiny_models.make_tiny_videoxl(base / "xl", seed=12),
    }


@pytest.fixture(scope="module")
def gguf_path(hf, tmp_path_factory):
    """gguf_path(kind, outtype) -> converted file (cached)."""
    base, cache = tmp_path_factory.mktemp("vision_gguf"), {}

    def get(kind: str, outtype: str) -> Path:
        if (kind, outtype) not in cache:
            cache[kind, outtype] = convert.convert(hf[kind], base / f"{kind}-{outtype}.gguf", outtype, progress=False)
        return cache[kind, outtype]
    return get


def reference(hf, kind: str) -> Reference:
    return onevision_reference(hf[kind])[0] if kind == "ov" else videoxl_reference(hf[kind])


def run_all(enc, px) -> dict[str, np.ndarray]:
    return {"features": enc.hidden_states(px), "projected": enc.projected(px), "pooled": enc.encode(px)}


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("kind", ["ov", "xl"])
def test_f32_matches_transformers(kind, hf, gguf_path):
    enc = _core.VisionEncoder.from_gguf(str(gguf_path(kind, "f32")), n_threads=2)
    px = pixels(3, enc.config["image_size"], seed=1)
    want = reference(hf, kind).run(px)
    got = run_all(enc, px)
    for stage in ("features", "projected", "pooled"):
        assert rel_err(got[stage], want[stage]) < TOL_EXACT, stage


@pytest.mark.parametrize("kind,outtype,tol", [("ov", "f16", TOL_EXACT), ("xl", "f16", TOL_EXACT),
                                              ("ov", "q8_0", TOL_Q8_0), ("xl", "q8_0", TOL_Q8_0)])
def test_quantized_matches_reference_with_file_weights(kind, outtype, tol, hf, gguf_path):
    path = gguf_path(kind, outtype)
    enc = _core.VisionEncoder.from_gguf(str(path), n_threads=2)
    px = pixels(2, enc.config["image_size"], seed=2)
    want = reference(hf, kind).load_gguf(path).run(px)
    got = run_all(enc, px)
    for stage in ("features", "projected", "pooled"):
        assert rel_err(got[stage], want[stage]) < tol, stage


@pytest.mark.parametrize("kind", ["ov", "xl"])
def test_f16_close_to_float32_checkpoint(kind, hf, gguf_path):
    enc = _core.VisionEncoder.from_gguf(str(gguf_path(kind, "f16")), n_threads=2)
    px = pixels(2, enc.config["image_size"], seed=3)
    assert rel_err(enc.encode(px), reference(hf, kind).run(px)["pooled"]) < TOL_F16_VS_F32


def test_onevision_video_features_end_to_end(hf, gguf_path):
    """encode() + one trailing image_newline == get_video_features(...).pooler_output."""
    ref, model = onevision_reference(hf["ov"])
    enc = _core.VisionEncoder.from_gguf(str(gguf_path("ov", "f32")), n_threads=2)
    cfg = model.config
    px = pixels(4, enc.config["image_size"], seed=4)
    with torch.no_grad():
        out = model.model.get_video_features(torch.from_numpy(px)[None], vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    want = out.pooler_output[0].numpy()  # [F * tokens + 1, n_embd]
    assert enc.config["newline"] == "end"
    got = np.concatenate([enc.encode(px), enc.image_newline[None]], axis=0)
    assert rel_err(got, want) < TOL_EXACT
    np.testing.assert_array_equal(enc.image_newline, model.model.image_newline.detach().numpy())


def test_onevision_real_grid_27_to_14(tmp_path):
    """The real SigLIP grid (27 x 27 -> 14 x 14 bilinear) on a 1-layer tiny-width tower."""
    hf_dir = tiny_models.make_tiny_llava_onevision(tmp_path / "hf", seed=13,
                                                   vision_config={"image_size": 378, "num_hidden_layers": 1})
    path = convert.convert(hf_dir, tmp_path / "m.gguf", "f32", progress=False)
    enc = _core.VisionEncoder.from_gguf(str(path), n_threads=2)
    assert (enc.config["grid"], enc.config["pool_grid"], enc.tokens_per_frame) == (27, 14, 196)
    px = pixels(2, 378, seed=5)
    want = onevision_reference(hf_dir)[0].run(px)
    got = run_all(enc, px)
    for stage in ("features", "projected", "pooled"):
        assert rel_err(got[stage], want[stage]) < TOL_EXACT, stage


@pytest.mark.parametrize("select", [-1, 1, 0])
def test_videoxl_select_layer(select, tmp_path):
    """HF hidden_states indexing: -1 = last layer, 1 = after the first layer, 0 = pre-LN embeddings."""
    hf_dir = tiny_models.make_tiny_videoxl(tmp_path / "hf", seed=14, select_layer=select)
    path = convert.convert(hf_dir, tmp_path / "m.gguf", "f32", progress=False)
    enc = _core.VisionEncoder.from_gguf(str(path), n_threads=2)
    assert enc.config["n_layer_run"] == {-1: 3, 1: 1, 0: 0}[select]
    px = pixels(2, enc.config["image_size"], seed=6)
    want = videoxl_reference(hf_dir).run(px)
    got = run_all(enc, px)
    for stage in ("features", "projected", "pooled"):
        assert rel_err(got[stage], want[stage]) < TOL_EXACT, stage


# ----------------------------------------------------------------------------- API behaviour

def test_config_and_shapes(gguf_path):
    ov = _core.VisionEncoder.from_gguf(str(gguf_path("ov", "f32")), n_threads=1)
    c = ov.config
    assert (c["kind"], c["act"], c["pool"], c["has_cls"], c["drop_cls"]) == ("siglip", "gelu_tanh", "bilinear", False, False)
    assert (c["image_size"], c["grid"], c["tokens_per_frame"], c["n_embd"]) == (70, 5, 9, 64)
    assert c["image_mean"] == [0.5, 0.5, 0.5] and c["resize"] == "square"
    assert ov.tokens_per_frame == 9 and ov.n_embd == 64 and ov.image_newline.shape == (64,)
    px = pixels(2, 70, seed=7)
    assert ov.hidden_states(px).shape == (50, 32)
    assert ov.projected(px).shape == (50, 64)
    assert ov.encode(px).shape == (18, 64)
    assert ov.encode(px[:0]).shape == (0, 64)

    xl = _core.VisionEncoder.from_gguf(str(gguf_path("xl", "f32")), n_threads=1)
    c = xl.config
    assert (c["kind"], c["act"], c["pool"], c["has_cls"], c["drop_cls"]) == ("clip", "quick_gelu", "avg", True, True)
    assert (c["image_size"], c["grid"], c["n_tokens"], c["tokens_per_frame"]) == (56, 4, 17, 4)
    assert c["resize"] == "shortest_center_crop" and xl.image_newline is None
    assert xl.hidden_states(pixels(1, 56, seed=8)).shape == (16, 32)  # CLS dropped
    assert xl.encode(pixels(3, 56, seed=8)).shape == (12, 64)


@pytest.mark.parametrize("kind", ["ov", "xl"])
def test_batching_and_threads_do_not_change_results(kind, gguf_path):
    """Frames are independent: any batch size and thread count gives bit-identical tokens."""
    path = str(gguf_path(kind, "q8_0"))
    one = _core.VisionEncoder.from_gguf(path, n_threads=1)
    two = _core.VisionEncoder.from_gguf(path, n_threads=2)
    px = pixels(5, one.config["image_size"], seed=9)
    one.batch_frames = 1
    two.batch_frames = 3  # 5 frames -> batches of 3 + 2
    a, b = one.encode(px), two.encode(px)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[: one.tokens_per_frame], two.encode(px[:1]))
    with pytest.raises(_core.Error):
        one.batch_frames = 0


def test_non_contiguous_and_float64_pixels(gguf_path):
    enc = _core.VisionEncoder.from_gguf(str(gguf_path("ov", "f32")), n_threads=2)
    px = pixels(2, 70, seed=10)
    want = enc.encode(px)
    strided = np.zeros((2, 3, 70, 140), np.float32)
    strided[..., ::2] = px
    np.testing.assert_array_equal(enc.encode(strided[..., ::2]), want)
    np.testing.assert_allclose(enc.encode(px.astype(np.float64)), want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 70, 71), (2, 4, 70, 70), (3, 70, 70), (1, 3, 56, 56)])
def test_wrong_pixel_shape(shape, gguf_path):
    enc = _core.VisionEncoder.from_gguf(str(gguf_path("ov", "f32")), n_threads=1)
    with pytest.raises(_core.Error, match=r"pixels must have shape \[n_frames, 3, 70, 70\]"):
        enc.encode(np.zeros(shape, np.float32))


# ----------------------------------------------------------------------------- format errors

def copy_gguf(src, dst, *, drop_tensors=(), drop_keys=(), set_keys=None) -> str:
    """Rewrite a GGUF without some tensors/keys, or with some keys changed: {key: (value, GGUFValueType)}."""
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    set_keys = dict(set_keys or {})
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys:
            continue
        if name in set_keys:
            value, vtype = set_keys.pop(name)
            w.add_key_value(name, value, vtype)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for name, (value, vtype) in set_keys.items():
        w.add_key_value(name, value, vtype)
    for t in r.tensors:
        if t.name not in drop_tensors:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, "copy_gguf expects an f32 file"
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


@pytest.mark.parametrize("kind,tensor", [("ov", "v.blk.1.attn_k.weight"), ("ov", "v.patch_embd.bias"),
                                         ("ov", "mm.2.bias"), ("ov", "mm.image_newline"),
                                         ("xl", "v.class_embd"), ("xl", "v.pre_ln.weight"),
                                         ("xl", "v.position_embd.weight")])
def test_missing_tensor_is_named(kind, tensor, gguf_path, tmp_path):
    bad = copy_gguf(gguf_path(kind, "f32"), tmp_path / "bad.gguf", drop_tensors={tensor})
    with pytest.raises(_core.FormatError, match=f"missing required tensor '{tensor}'"):
        _core.VisionEncoder.from_gguf(bad)


def test_unused_tensors_may_be_absent(gguf_path, tmp_path):
    """post-LN is never applied; a file without it still loads and gives the same tokens."""
    src = gguf_path("ov", "f32")
    ok = copy_gguf(src, tmp_path / "ok.gguf", drop_tensors={"v.post_ln.weight", "v.post_ln.bias"})
    px = pixels(1, 70, seed=11)
    np.testing.assert_array_equal(_core.VisionEncoder.from_gguf(ok).encode(px),
                                  _core.VisionEncoder.from_gguf(str(src)).encode(px))


def test_bad_metadata(gguf_path, tmp_path):
    V = gguf.GGUFValueType
    src = gguf_path("ov", "f32")
    cases = [
        ({"drop_keys": {"x2l.vision.kind"}}, "x2l.vision.kind"),
        ({"set_keys": {"x2l.vision.kind": ("eva", V.STRING)}}, "unsupported x2l.vision.kind 'eva'"),
        ({"set_keys": {"x2l.pool.mode": ("max", V.STRING)}}, "unsupported x2l.pool.mode 'max'"),
        ({"set_keys": {"x2l.vision.select_layer": (5, V.INT32)}}, "select_layer 5 is out of range"),
        ({"set_keys": {"x2l.tokens_per_frame": (25, V.UINT32)}}, "x2l.tokens_per_frame is 25"),
        ({"set_keys": {"clip.vision.attention.head_count": (3, V.UINT32)}}, "not a multiple of head_count"),
        ({"set_keys": {"clip.vision.embedding_length": (48, V.UINT32)}}, "v.patch_embd.weight"),
    ]
    for i, (edit, msg) in enumerate(cases):
        bad = copy_gguf(src, tmp_path / f"bad{i}.gguf", **edit)
        with pytest.raises(_core.FormatError, match=msg):
            _core.VisionEncoder.from_gguf(bad)


def test_text_only_model_has_no_vision_encoder(tiny_gguf):
    with pytest.raises(_core.FormatError, match="model has no vision encoder"):
        _core.VisionEncoder.from_gguf(tiny_gguf("qwen2", "f32"))
