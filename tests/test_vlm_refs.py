"""The VLM references of issue 20 against transformers and llama.cpp's converter.

tests/vlm_refs.py builds tiny Qwen2-VL / Qwen2.5-VL / Idefics3 / SmolVLM / InternVL checkpoints; tests/vlm_numpy.py
holds float64 NumPy references written from the models' definitions. Here each reference is checked
against transformers (float32, eager attention) on those checkpoints, and llama.cpp's converter is run
on them to pin the two-file layouts docs/families.md describes. These references are what the C++
ops and the runtime will be tested against.

Tolerances: index computations (positions, resize targets, windows, patch order, prompt text) are
exact. Float pieces compare float64 NumPy with float32 torch: the measured worst differences are
~4e-6 (rotations, vision embeddings of magnitude ~5-20) and ~2e-5 (logits of magnitude ~8), so
rtol = atol = 1e-4 leaves a 5x margin while a wrong axis, order or norm moves values by O(1). Where a
feature could be dropped without breaking shapes (M-RoPE's h/w sections, 3-D vs 1-D positions, Qwen2.5's
windows, InternViT's layer scales) the test also shows that dropping it moves the output by > 0.05.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import vlm_numpy as vn
import vlm_refs

QWEN = ("qwen2vl", "qwen25vl")
IDEFICS = ("idefics3", "smolvlm")
ALL = QWEN + IDEFICS + ("internvl",)
TOL = dict(rtol=1e-4, atol=1e-4)


def _cfg(path):
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_models(vlm_hf):
    """{family: transformers model} (f32, eager), loaded once."""
    return {fam: vlm_refs.load_model(path) for fam, path in vlm_hf.items()}


@pytest.fixture(scope="module")
def state_dicts(vlm_hf):
    return {fam: vn.load_state_dict(path) for fam, path in vlm_hf.items()}


# ----------------------------------------------------------------------------- the checkpoints


def test_checkpoints_are_deterministic(tmp_path, vlm_hf):
    a = vlm_refs.make_tiny_qwen25vl(tmp_path / "a", seed=3)
    b = vlm_refs.make_tiny_qwen25vl(tmp_path / "b", seed=3)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # The session's qwen25vl is the same builder with another seed.
    assert (a / "model.safetensors").read_bytes() != (vlm_hf["qwen25vl"] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", ALL)
def test_checkpoint_shapes(vlm_hf, family):
    path = vlm_hf[family]
    cfg, info = _cfg(path), vlm_refs.family_info(path)
    assert info.family == family
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.json", "preprocessor_config.json"):
        assert (path / name).is_file(), name
    text = cfg["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (64, 2, 49216)
    # SmolLM2's tokenizer first, the family's media specials appended after its 49152 tokens.
    specials = (vlm_refs.QWEN_VL_SPECIALS if family in QWEN else vlm_refs.IDEFICS3_SPECIALS if family in IDEFICS
                else vlm_refs.INTERNVL_SPECIALS)
    assert [info.token_ids[t] for t in specials] == list(range(49152, 49152 + len(specials)))
    assert [info.token_ids[t] for t in vlm_refs.SMOLLM2_SPECIALS] == [0, 1, 2]
    if family == "qwen2vl":
        assert cfg["vision_config"]["depth"] >= 3  # llama.cpp's converter maps merger.mlp.2 to a block id
        assert text["rope_parameters"]["mrope_section"] == [2, 3, 3]
    if family == "qwen25vl":
        assert cfg["vision_config"]["fullatt_block_indexes"] == [1, 3]
    if family in IDEFICS:
        assert (info.image_size // info.patch_size) ** 2 // info.merge ** 2 == 4
        assert json.loads((path / "processor_config.json").read_text())["image_seq_len"] == 4
    if family == "internvl":
        assert cfg["vision_config"]["num_hidden_layers"] >= 4  # llama.cpp's converter maps mlp1.3 to a block id
        assert cfg["image_seq_length"] == 4 and cfg["vision_config"]["architectures"] == ["InternVisionModel"]


def test_tokenizer_is_smollm2s(vlm_hf):
    """The tokenizer reproduces SmolLM2's pre-tokenization (digits split one by one, byte-level BPE)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(vlm_hf["smolvlm"] / "tokenizer.json"))
    vocab, _ = vlm_refs._smollm2_vocab()
    ids = tok.encode("Frame 2024 at 00:05", add_special_tokens=False).ids
    pieces = [tok.id_to_token(i) for i in ids]
    assert "".join(pieces).replace("Ġ", " ") == "Frame 2024 at 00:05"
    assert pieces[pieces.index("Ġ") + 1:pieces.index("Ġ") + 5] == ["2", "0", "2", "4"]
    assert all(vocab[p] == i for p, i in zip(pieces, ids))
    assert tok.encode("<|vision_start|><image>", add_special_tokens=False).ids[-1] == \
        vlm_refs.family_info(vlm_hf["smolvlm"]).token_ids["<image>"]


def test_read_gguf_matches_gguf_py(tmp_path):
    """read_gguf (used because gguf-py's reader takes ~30 s on a 49k-token vocabulary) reads what gguf-py writes."""
    import gguf

    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "clip")
    w.add_uint32("a.u32", 7)
    w.add_float32("a.f32", 0.5)
    w.add_bool("a.bool", True)
    w.add_string("a.str", "héllo")
    w.add_array("a.ints", [1, -2, 3])
    w.add_array("a.strs", ["x", "", "yz"])
    rng = np.random.default_rng(0)
    t32 = rng.standard_normal((3, 5)).astype(np.float32)
    t16 = rng.standard_normal((2, 4, 6)).astype(np.float16)
    w.add_tensor("t32", t32)
    w.add_tensor("t16", t16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta, tensors = vlm_refs.read_gguf(path)
    assert meta["general.architecture"] == "clip"
    assert (meta["a.u32"], meta["a.f32"], meta["a.bool"], meta["a.str"]) == (7, 0.5, True, "héllo")
    assert meta["a.ints"] == [1, -2, 3] and meta["a.strs"] == ["x", "", "yz"]
    assert tensors["t32"][:2] == (0, (5, 3)) and tensors["t16"][:2] == (1, (6, 4, 2))
    np.testing.assert_array_equal(vlm_refs.gguf_array(path, tensors["t32"]), t32)
    np.testing.assert_array_equal(vlm_refs.gguf_array(path, tensors["t16"]), t16)
    only = vlm_refs.read_gguf(path, {"a.u32"})[0]
    assert only["a.u32"] == 7 and set(only) <= {"a.u32", "general.alignment"}
    with pytest.raises(ValueError, match="not a GGUF"):
        vlm_refs.read_gguf(__file__)


# ----------------------------------------------------------------------------- M-RoPE positions

# (media in prompt order: ("v"|"i", grid), seconds_per_grid of each video)
MROPE_CASES = {
    "image": ([("i", (1, 6, 4))], []),
    "video_short": ([("v", (2, 8, 12))], [1.0]),       # T(last) = 1 < max(h, w)/2 = 6: both rules agree
    "video_long": ([("v", (6, 4, 4))], [0.5]),        # T(last) = 5 >= 2: the rules differ
    "video_then_image": ([("v", (5, 4, 8)), ("i", (1, 4, 4))], [1 / 12]),
    "two_videos": ([("v", (3, 4, 4)), ("v", (4, 8, 4))], [2.0, 0.25]),
}


def _mrope_prompt(media):
    types, grids_i, grids_v, order = [vn.TEXT] * 5, [], [], []
    for kind, grid in media:
        n = grid[0] * grid[1] * grid[2] // 4
        types += [vn.TEXT] + [vn.VIDEO if kind == "v" else vn.IMAGE] * n + [vn.TEXT] * 3
        (grids_v if kind == "v" else grids_i).append(grid)
        order.append(grid)
    return types, grids_i, grids_v, order


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("case", sorted(MROPE_CASES))
def test_mrope_positions_match_transformers(hf_models, vlm_hf, family, case):
    import torch

    media, spg = MROPE_CASES[case]
    types, grids_i, grids_v, order = _mrope_prompt(media)
    model = hf_models[family].model
    kwargs = {}
    tps = None
    if family == "qwen25vl":
        tps = vlm_refs.family_info(vlm_hf[family]).tokens_per_second
        kwargs["second_per_grid_ts"] = torch.tensor(spg, dtype=torch.float32) if spg else None
    ref, ref_delta = model.get_rope_index(
        torch.zeros(1, len(types), dtype=torch.long), torch.tensor([types]),
        image_grid_thw=torch.tensor(grids_i) if grids_i else None,
        video_grid_thw=torch.tensor(grids_v) if grids_v else None, **kwargs)
    ref = ref[:, 0].numpy()
    spatial, delta = vn.mrope_positions(types, order, 2, seconds_per_grid=spg if tps else None,
                                        tokens_per_second=tps, text_after="spatial")
    np.testing.assert_array_equal(spatial, ref)  # transformers 5.x implements the "spatial" rule
    assert delta == int(ref_delta)

    # The original rule: text after a media run starts one past the run's largest position; it
    # agrees with the "spatial" rule exactly when no run's last temporal position reaches max(h, w)/2.
    orig, _ = vn.mrope_positions(types, order, 2, seconds_per_grid=spg if tps else None,
                                 tokens_per_second=tps, text_after="max")
    t = np.asarray(types)
    starts = [i for i in range(len(t)) if t[i] != vn.TEXT and t[i - 1] == vn.TEXT]
    agree = True
    for a, (kind, g) in zip(starts, media):
        b = a + g[0] * g[1] * g[2] // 4
        np.testing.assert_array_equal(orig[:, a:b] - orig[1, a], spatial[:, a:b] - spatial[1, a])
        assert (orig[:, b] == orig[:, a:b].max() + 1).all()
        agree &= bool(orig[0, a:b].max() - orig[1, a] < max(g[1], g[2]) // 2)
    assert np.array_equal(orig, ref) == agree
    if case == "video_long":
        assert not agree


def test_mrope_positions_docstring_example():
    """Qwen2.5-VL's documented example: 3 temporal patches of 2x2 merged cells, fps 1, temporal patch 2,
    tokens_per_second 25 -> interval 50: t = [0]*4 + [50]*4 + [100]*4, text continues at 101."""
    types = [vn.VIDEO] * 12 + [vn.TEXT] * 5
    pos, delta = vn.mrope_positions(types, [(3, 4, 4)], 2, seconds_per_grid=[2.0], tokens_per_second=25)
    assert pos[0, :12].tolist() == [0] * 4 + [50] * 4 + [100] * 4
    assert pos[1, :12].tolist() == [0, 0, 1, 1] * 3 and pos[2, :12].tolist() == [0, 1, 0, 1] * 3
    assert pos[:, 12:].tolist() == [[101, 102, 103, 104, 105]] * 3
    assert delta == 106 - 17


def test_mrope_positions_text_only_and_errors():
    pos, delta = vn.mrope_positions([vn.TEXT] * 7, [], 2)
    assert (pos == np.arange(7)).all() and delta == 0
    with pytest.raises(ValueError, match="needs 4"):
        vn.mrope_positions([vn.VIDEO] * 3, [(1, 4, 4)], 2)
    with pytest.raises(ValueError, match="left over"):
        vn.mrope_positions([vn.TEXT] * 3, [(1, 4, 4)], 2)


@pytest.mark.parametrize("family", QWEN)
def test_mrope_rotation_matches_transformers(hf_models, vlm_hf, family):
    """q/k rotated with 3-D positions and rope sections [2, 3, 3] over head_dim 16."""
    import torch
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m

    text_cfg = hf_models[family].config.text_config
    rope = hf_models[family].model.language_model.rotary_emb
    rng = np.random.default_rng(5)
    n, heads, hd = 23, 4, 16
    pos3 = rng.integers(0, 3000, size=(3, n))
    q = rng.standard_normal((n, heads, hd))
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos3)[:, None, :])
    ref, _ = m.apply_rotary_pos_emb(torch.from_numpy(q).float().transpose(0, 1)[None],
                                    torch.zeros(1, heads, n, hd), cos, sin)
    ref = ref[0].transpose(0, 1).numpy()
    theta = text_cfg.rope_parameters["rope_theta"]
    sections = text_cfg.rope_parameters["mrope_section"]
    mine = vn.rope_neox(q, vn.mrope_angles(pos3, hd, theta, sections))
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=2e-4)  # angles up to 3000 rad in float32
    one_d = vn.rope_neox(q, vn.mrope_angles(np.repeat(pos3[:1], 3, axis=0), hd, theta, sections))
    assert np.abs(one_d - ref).max() > 0.1  # the h/w sections matter
    with pytest.raises(ValueError, match="summing"):
        vn.mrope_angles(pos3, hd, theta, [2, 3, 4])


# ----------------------------------------------------------------------------- Qwen preprocessing


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    sizes = [(h, w) for h in (20, 56, 57, 100, 224, 333, 480, 720, 1080, 2000) for w in (28, 71, 360, 640, 1280)]
    for h, w in sizes:
        for lo, hi in ((56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28)):
            assert vn.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ValueError):
        vn.smart_resize(10, 3000)


def test_qwen_patchify_matches_processor():
    """Pixel rows and grid of an image already at a 28-multiple size equal Qwen2VLImageProcessor's."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(6)
    img = (rng.random((84, 112, 3)) * 255).astype(np.uint8)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                                    image_mean=vlm_refs.CLIP_MEAN, image_std=vlm_refs.CLIP_STD)
    out = proc(images=[img], return_tensors="np")
    x = (img.astype(np.float64) / 255 - vlm_refs.CLIP_MEAN) / vlm_refs.CLIP_STD
    rows, grid = vn.qwen_patchify(x.transpose(2, 0, 1)[None])
    assert grid == tuple(out["image_grid_thw"][0]) == (1, 6, 8)
    np.testing.assert_allclose(rows, out["pixel_values"], rtol=0, atol=1e-5)


def test_conv3d_is_two_conv2d(state_dicts):
    """The Conv3D patch embedding over a frame pair = 2-D conv of frame 0 with kernel[:, :, 0] plus
    2-D conv of frame 1 with kernel[:, :, 1] (how llama.cpp stores it), and qwen_patchify puts the
    patch at (y, x) in merge-window order."""
    import torch

    w = state_dicts["qwen25vl"]["visual.patch_embed.proj.weight"]  # [32, 3, 2, 14, 14]
    rng = np.random.default_rng(7)
    frames = rng.standard_normal((2, 3, 56, 84))
    rows, (t, h, wd) = vn.qwen_patchify(frames)
    emb = rows @ w.reshape(w.shape[0], -1).T  # [t*h*w, 32] in merge-window order
    two = sum(torch.nn.functional.conv2d(torch.from_numpy(frames[f:f + 1]), torch.from_numpy(w[:, :, f]), stride=14)
              for f in range(2))[0].numpy()  # [32, h, w] in raster order
    yx = vn.patch_coords((t, h, wd), 2)
    np.testing.assert_allclose(emb, two[:, yx[:, 0], yx[:, 1]].T, rtol=1e-10, atol=1e-10)


def test_window_ids():
    """Windows of 2x2 merged cells on a 3x5 merged grid: 2 x 3 windows, the last row/column partial."""
    ids = vn.window_ids([(1, 6, 10)], merge=2, window_merged=2)
    coords = vn.patch_coords((1, 6, 10), 2)
    expect = (coords[:, 0] // 4) * 3 + coords[:, 1] // 4
    np.testing.assert_array_equal(ids, expect)
    assert np.bincount(ids).tolist() == [16, 16, 8, 8, 8, 4]
    two = vn.window_ids([(2, 6, 10), (1, 4, 4)], merge=2, window_merged=2)
    np.testing.assert_array_equal(two[:60], ids)            # temporal patch 0
    np.testing.assert_array_equal(two[60:120], ids + 6)     # temporal patch 1: its own 6 windows
    assert (two[120:] == 12).all()                          # the image: one window


# ----------------------------------------------------------------------------- vision towers


def _qwen_media(seed=8):
    rng = np.random.default_rng(seed)
    video = rng.standard_normal((5, 3, 168, 224))  # odd frame count: the last frame is repeated;
    image = rng.standard_normal((1, 3, 84, 56))     # merged 6x8 and 3x2: 4x4-cell windows, partial ones
    r1, g1 = vn.qwen_patchify(video)
    r2, g2 = vn.qwen_patchify(image)
    return np.concatenate([r1, r2]), [g1, g2]


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vision_tower_matches_transformers(hf_models, state_dicts, vlm_hf, family):
    import torch

    rows, grids = _qwen_media()
    assert grids == [(3, 12, 16), (1, 6, 4)]
    with torch.no_grad():
        ref = hf_models[family].model.visual(torch.from_numpy(rows).float(),
                                             grid_thw=torch.tensor(grids)).pooler_output.numpy()
    vcfg = _cfg(vlm_hf[family])["vision_config"]
    mine = vn.qwen_vision_forward(state_dicts[family], vcfg, rows, grids)
    assert mine.shape == (3 * 6 * 8 + 3 * 2, 64)
    np.testing.assert_allclose(mine, ref, **TOL)
    if family == "qwen25vl":  # the windows matter: full attention in every block gives another output
        all_full = dict(vcfg, fullatt_block_indexes=list(range(vcfg["depth"])))
        assert np.abs(vn.qwen_vision_forward(state_dicts[family], all_full, rows, grids) - ref).max() > 0.05
    merged_t = vn.qwen_vision_forward(state_dicts[family], vcfg, rows, [(1, 12, 16)] * 3 + [(1, 6, 4)])
    np.testing.assert_allclose(merged_t, ref, **TOL)  # temporal patches never attend to each other


def test_pixel_shuffle_matches_transformers(hf_models):
    import torch

    conn = hf_models["smolvlm"].model.connector
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 64, 5))
    for scale in (2, 4):
        ref = conn.pixel_shuffle(torch.from_numpy(x), scale).numpy()
        np.testing.assert_array_equal(vn.pixel_shuffle(x, scale), ref)
    out = vn.pixel_shuffle(x, 2)  # token (0, 1) of the 4x4 output = input rows 0..1, cols 2..3
    np.testing.assert_array_equal(out[0, 1], np.concatenate([x[0, 2], x[0, 3], x[0, 10], x[0, 11]]))
    with pytest.raises(ValueError):
        vn.pixel_shuffle(x[:, :60], 2)


@pytest.mark.parametrize("family", IDEFICS)
def test_idefics3_vision_tower_matches_transformers(hf_models, state_dicts, vlm_hf, family):
    import torch

    info = vlm_refs.family_info(vlm_hf[family])
    rng = np.random.default_rng(10)
    images = rng.standard_normal((3, 3, info.image_size, info.image_size))
    with torch.no_grad():
        ref = hf_models[family].model.get_image_features(torch.from_numpy(images).float()[None]).pooler_output[0]
    mine = vn.idefics3_vision_forward(state_dicts[family], _cfg(vlm_hf[family])["vision_config"], images, info.merge)
    assert mine.shape == (3, 4, 64)
    np.testing.assert_allclose(mine.reshape(-1, 64), ref.numpy(), **TOL)


def test_internvl_vision_tower_matches_transformers(hf_models, state_dicts, vlm_hf):
    import torch

    rng = np.random.default_rng(13)
    images = rng.standard_normal((3, 3, 56, 56))
    with torch.no_grad():
        ref = hf_models["internvl"].model.get_image_features(
            torch.from_numpy(images).float(), vision_feature_layer=-1,
            vision_feature_select_strategy="default").pooler_output.numpy()
    vcfg = _cfg(vlm_hf["internvl"])["vision_config"]
    mine = vn.internvl_vision_forward(state_dicts["internvl"], vcfg, images)
    assert mine.shape == (3, 4, 64)
    np.testing.assert_allclose(mine, ref, **TOL)
    no_scale = {k: (np.ones_like(v) if k.endswith(("lambda_1", "lambda_2")) else v)
                for k, v in state_dicts["internvl"].items()}
    assert np.abs(vn.internvl_vision_forward(no_scale, vcfg, images) - ref).max() > 0.05  # layer scales matter


# ----------------------------------------------------------------------------- prompts and logits


def test_smolvlm_video_text_matches_processor():
    """Our SmolVLM2 video expansion is the processor's replace_video_token output, for 8 and 64 frames."""
    from types import SimpleNamespace

    from num2words import num2words  # the test extra: transformers' SmolVLM video prompts need it

    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    stub = SimpleNamespace(image_seq_len=4, fake_image_token="<fake_token_around_image>",
                           image_token="<image>", global_image_token="<global-img>")
    for n, fps, duration in ((8, 1.0, 8.4), (64, 0.5, 130.0), (3, 1 / 30, 95.0)):
        ts = [i / fps for i in range(n)]
        meta = SimpleNamespace(fps=fps, timestamps=ts, duration=duration)
        ref = SmolVLMProcessor.replace_video_token(stub, {"video_metadata": [meta]}, 0)
        assert vn.smolvlm_video_text(ts, duration, 4) == ref
    assert all(vn.number_words(i) == num2words(i) for i in range(1000))


@pytest.mark.parametrize("family", IDEFICS)
def test_smolvlm_chat_template(vlm_hf, family):
    from jinja2 import Template

    tpl = json.loads((vlm_hf[family] / "chat_template.json").read_text())["chat_template"]
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = Template(tpl).render(messages=msgs, add_generation_prompt=True)
    assert text == "<|im_start|>User: <video>What happens?<end_of_utterance>\nAssistant:"
    assert vn.smolvlm_video_prompt([0, 1], 2, 4, "What happens?") == text.replace(
        "<video>", vn.smolvlm_video_text([0, 1], 2, 4))


@pytest.mark.parametrize("family", QWEN)
def test_qwen_chat_template(vlm_hf, family):
    from jinja2 import Template

    tpl = json.loads((vlm_hf[family] / "chat_template.json").read_text())["chat_template"]
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}]
    assert Template(tpl).render(messages=msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>Why?<|im_end|>\n<|im_start|>assistant\n")


def _encode(path, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("family", QWEN)
def test_qwen_video_prompt_logits_match_transformers(hf_models, state_dicts, vlm_hf, family):
    """Logits of a system + user(video, question) + assistant prompt: 8 frames of 56x84 -> grid (4, 4, 6),
    24 video tokens, T(last) = 3 = max(h, w)/2 (Qwen2.5: fps 2 -> T = 0, 2, 4, 6)."""
    import torch

    path, info, cfg = vlm_hf[family], vlm_refs.family_info(vlm_hf[family]), _cfg(vlm_hf[family])
    rows, grid = vn.qwen_patchify(np.random.default_rng(11).standard_normal((8, 3, 56, 84)))
    pre = _encode(path, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    post = _encode(path, "What is in the video?<|im_end|>\n<|im_start|>assistant\n")
    media = vn.qwen_media_tokens(info.token_ids, grid, 2)
    ids = pre + media + post
    types = [vn.TEXT] * (len(pre) + 1) + [vn.VIDEO] * (len(media) - 2) + [vn.TEXT] * (len(post) + 1)
    spg = [info.temporal_patch / 2.0]  # frames sampled at 2 fps
    extra = {"second_per_grid_ts": torch.tensor(spg)} if family == "qwen25vl" else {}
    with torch.no_grad():
        ref = hf_models[family](input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(rows).float(),
                                video_grid_thw=torch.tensor([grid]), mm_token_type_ids=torch.tensor([types]),
                                **extra).logits[0].numpy()
    sd = state_dicts[family]
    emb = sd["model.embed_tokens.weight"][ids]
    emb[np.asarray(types) == vn.VIDEO] = vn.qwen_vision_forward(sd, cfg["vision_config"], rows, [grid])
    tps = info.tokens_per_second
    pos, _ = vn.mrope_positions(types, [grid], 2, seconds_per_grid=spg if tps else None, tokens_per_second=tps,
                                text_after="spatial")
    logits = vn.llm_forward(sd, cfg["text_config"], emb, pos, prefix="model.")
    np.testing.assert_allclose(logits, ref, **TOL)
    flat = vn.llm_forward(sd, cfg["text_config"], emb, np.arange(len(ids)), prefix="model.")
    assert np.abs(flat - ref).max() > 0.1  # 1-D positions would be visibly wrong


@pytest.mark.parametrize("family", IDEFICS)
def test_smolvlm_video_prompt_logits_match_transformers(hf_models, state_dicts, vlm_hf, family):
    """Logits of SmolVLM2's video prompt (3 frames at 1 fps, 4 tokens each), frames as images."""
    import torch

    path, info, cfg = vlm_hf[family], vlm_refs.family_info(vlm_hf[family]), _cfg(vlm_hf[family])
    frames = np.random.default_rng(12).standard_normal((3, 3, info.image_size, info.image_size))
    ids = _encode(path, vn.smolvlm_video_prompt([0, 1, 2], 3, 4, "What happens?"))
    is_img = np.asarray(ids) == info.token_ids["<image>"]
    assert is_img.sum() == 12
    with torch.no_grad():
        ref = hf_models[family](input_ids=torch.tensor([ids]),
                                pixel_values=torch.from_numpy(frames).float()[None]).logits[0].numpy()
    sd = state_dicts[family]
    emb = sd["model.text_model.embed_tokens.weight"][ids]
    emb[is_img] = vn.idefics3_vision_forward(sd, cfg["vision_config"], frames, info.merge).reshape(-1, 64)
    logits = vn.llm_forward(sd, cfg["text_config"], emb, np.arange(len(ids)), prefix="model.text_model.")
    np.testing.assert_allclose(logits, ref, **TOL)


def test_internvl_video_text_matches_processor():
    from types import SimpleNamespace

    from transformers.models.internvl.processing_internvl import InternVLProcessor

    stub = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                           image_seq_length=4)
    for n in (1, 3, 12):
        frames = {"pixel_values_videos": [np.zeros((n, 3, 2, 2))]}
        assert vn.internvl_video_text(n, 4) == InternVLProcessor.replace_video_token(stub, frames, 0)


def test_internvl_video_prompt_logits_match_transformers(hf_models, state_dicts, vlm_hf):
    """Logits of a user turn with 3 frames (4 <IMG_CONTEXT> each) and a question; frames as images."""
    import torch

    path, cfg = vlm_hf["internvl"], _cfg(vlm_hf["internvl"])
    info = vlm_refs.family_info(path)
    frames = np.random.default_rng(14).standard_normal((3, 3, 56, 56))
    ids = _encode(path, "<|im_start|>user\n" + vn.internvl_video_text(3, 4)
                  + "\nWhat happens?<|im_end|>\n<|im_start|>assistant\n")
    is_img = np.asarray(ids) == info.token_ids["<IMG_CONTEXT>"]
    assert is_img.sum() == 12
    with torch.no_grad():
        ref = hf_models["internvl"](input_ids=torch.tensor([ids]),
                                    pixel_values=torch.from_numpy(frames).float()).logits[0].numpy()
    sd = state_dicts["internvl"]
    emb = sd["model.language_model.embed_tokens.weight"][ids]
    emb[is_img] = vn.internvl_vision_forward(sd, cfg["vision_config"], frames).reshape(-1, 64)
    logits = vn.llm_forward(sd, cfg["text_config"], emb, np.arange(len(ids)), prefix="model.language_model.")
    np.testing.assert_allclose(logits, ref, **TOL)


# ----------------------------------------------------------------------------- llama.cpp's files

EXPECT = {
    "qwen2vl": dict(arch="qwen2vl", projector="qwen2vl_merger", blocks=3),
    "qwen25vl": dict(arch="qwen2vl", projector="qwen2.5vl_merger", blocks=4),
    "idefics3": dict(arch="llama", projector="idefics3", blocks=2),
    "smolvlm": dict(arch="llama", projector="idefics3", blocks=2),
    "internvl": dict(arch="qwen2", projector="internvl", blocks=4),
}


@pytest.mark.parametrize("family", ALL)
def test_llama_cpp_pair_layout(vlm_llama_cpp, vlm_hf, state_dicts, family):
    """What llama.cpp's converter writes for each family (docs/families.md), f32: keys, names, values."""
    model_path, mmproj_path = (str(p) for p in vlm_llama_cpp("f32")[family])
    meta, tensors = vlm_refs.read_gguf(model_path)
    mmeta, mtensors = vlm_refs.read_gguf(mmproj_path)
    exp, sd, cfg = EXPECT[family], state_dicts[family], _cfg(vlm_hf[family])
    arch = meta["general.architecture"]
    assert arch == exp["arch"]
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 49216
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
    assert mmeta["general.architecture"] == "clip" and mmeta["general.type"] == "mmproj"
    assert mmeta["clip.projector_type"] == exp["projector"]
    assert mmeta["clip.vision.block_count"] == exp["blocks"] and mmeta["clip.vision.projection_dim"] == 64
    get = lambda name: vlm_refs.gguf_array(mmproj_path, mtensors[name])
    if family in QWEN:
        assert meta["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
        assert mmeta["clip.vision.patch_size"] == 14
        w = sd["visual.patch_embed.proj.weight"]
        np.testing.assert_array_equal(get("v.patch_embd.weight"), w[:, :, 0])
        np.testing.assert_array_equal(get("v.patch_embd.weight.1"), w[:, :, 1])
        q, k, v = np.split(sd["visual.blocks.0.attn.qkv.weight"], 3)
        np.testing.assert_array_equal(get("v.blk.0.attn_k.weight"), k)
        np.testing.assert_array_equal(get("mm.0.weight"), sd["visual.merger.mlp.0.weight"])
        np.testing.assert_array_equal(get("v.post_ln.weight"), sd["visual.merger.ln_q.weight"])
        # Neither the LLM's q/k (NEOX rope) nor anything else is permuted.
        np.testing.assert_array_equal(vlm_refs.gguf_array(model_path, tensors["blk.1.attn_q.weight"]),
                                      sd["model.layers.1.self_attn.q_proj.weight"])
        if family == "qwen25vl":
            assert mmeta["clip.vision.n_wa_pattern"] == 2 and mmeta["clip.use_silu"] is True
            assert "v.blk.0.ffn_gate.weight" in mtensors and "v.blk.0.ln1.bias" not in mtensors
        else:
            assert "clip.vision.n_wa_pattern" not in mmeta and "v.blk.0.ln1.bias" in mtensors
    elif family == "internvl":
        vt, mp = "model.vision_tower.", "model.multi_modal_projector."
        assert mmeta["clip.vision.projector.scale_factor"] == 2 and mmeta["clip.use_gelu"] is True
        assert mmeta["clip.vision.image_size"] == 56 and mmeta["clip.vision.patch_size"] == 14
        np.testing.assert_array_equal(get("v.class_embd").ravel(), sd[vt + "embeddings.cls_token"].ravel())
        np.testing.assert_array_equal(get("v.position_embd.weight").reshape(17, 32),
                                      sd[vt + "embeddings.position_embeddings"].reshape(17, 32))
        np.testing.assert_array_equal(get("v.blk.2.ls1.weight"), sd[vt + "encoder.layer.2.lambda_1"])
        np.testing.assert_array_equal(get("v.blk.2.attn_out.weight"),
                                      sd[vt + "encoder.layer.2.attention.projection_layer.weight"])
        np.testing.assert_array_equal(get("mm.model.mlp.0.weight"), sd[mp + "layer_norm.weight"])
        np.testing.assert_array_equal(get("mm.model.mlp.1.weight"), sd[mp + "linear_1.weight"])
        np.testing.assert_array_equal(get("mm.model.mlp.3.weight"), sd[mp + "linear_2.weight"])
        np.testing.assert_array_equal(vlm_refs.gguf_array(model_path, tensors["blk.1.attn_q.weight"]),
                                      sd["model.language_model.layers.1.self_attn.q_proj.weight"])
    else:
        assert mmeta["clip.vision.projector.scale_factor"] == info_merge(vlm_hf, family)
        assert mmeta["clip.vision.image_size"] == cfg["vision_config"]["image_size"]
        np.testing.assert_array_equal(get("mm.model.fc.weight"), sd["model.connector.modality_projection.proj.weight"])
        np.testing.assert_array_equal(get("v.position_embd.weight"),
                                      sd["model.vision_model.embeddings.position_embedding.weight"])
        # Llama q/k rows are permuted for llama.cpp's interleaved rope, as in any llama GGUF.
        assert not np.array_equal(vlm_refs.gguf_array(model_path, tensors["blk.0.attn_q.weight"]),
                                  sd["model.text_model.layers.0.self_attn.q_proj.weight"])


def info_merge(vlm_hf, family):
    return vlm_refs.family_info(vlm_hf[family]).merge


def test_llama_cpp_q8_0_pairs(vlm_llama_cpp):
    """--outtype q8_0: 2-D LLM matrices in Q8_0 (type 8); norms stay F32 (type 0)."""
    for family, (model_path, mmproj_path) in vlm_llama_cpp("q8_0").items():
        _, tensors = vlm_refs.read_gguf(str(model_path))
        assert tensors["blk.0.attn_q.weight"][0] == 8, family
        assert tensors["blk.0.attn_norm.weight"][0] == 0, family
        _, mtensors = vlm_refs.read_gguf(str(mmproj_path))
        assert mtensors["v.blk.0.attn_q.weight"][0] == 8, family
