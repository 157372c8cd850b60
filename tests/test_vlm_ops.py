"""The C++ VLM index and rotation functions (cpp/cpu/mrope.h, cpp/cpu/vision_layout.h) against the NumPy
references of tests/vlm_numpy.py (themselves checked against transformers in test_vlm_refs.py) and,
where transformers exposes the same index computation, against transformers directly.

Index results (positions, patch order, windows, pixel shuffle) must be exact. Rotations are float32 in
C++ and float64 in NumPy from the same float32 angles: measured differences are ~1e-6 on values of
magnitude ~3, so rtol = atol = 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest

import probes
import vlm_numpy as vn

ops = probes.require().vlm_ops


# ----------------------------------------------------------------------------- rotations

@pytest.mark.parametrize("head_dim,theta,sections", [(16, 1e6, (2, 3, 3)), (128, 1e6, (16, 24, 24)),
                                                     (64, 1e4, (32, 0, 0))])
def test_mrope_axes_and_rotation(head_dim, theta, sections):
    freq, axis = ops.mrope_axes(head_dim, theta, sections)
    np.testing.assert_array_equal(freq, vn.rope_inv_freq(head_dim, theta).astype(np.float32))
    np.testing.assert_array_equal(axis, np.repeat(np.arange(3), sections))
    rng = np.random.default_rng(0)
    n, heads = 37, 3
    pos = rng.integers(0, 5000, size=(3, n)).astype(np.int32)
    x = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
    got = ops.rope_apply(x, freq, axis, pos)
    ref = vn.rope_neox(x.astype(np.float64), vn.mrope_angles(pos, head_dim, theta, sections))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # Text positions (t = h = w) reduce to plain 1-D NEOX RoPE.
    same = np.repeat(pos[:1], 3, axis=0)
    inv = vn.rope_inv_freq(head_dim, theta).astype(np.float32)
    plain = vn.rope_neox(x.astype(np.float64), (pos[0].astype(np.float32)[:, None] * inv).astype(np.float64))
    np.testing.assert_allclose(ops.rope_apply(x, freq, axis, same), plain, rtol=1e-5, atol=1e-5)


def test_vision_rope_matches_reference():
    head_dim = 80  # Qwen2-VL's ViT: 1280 / 16 heads
    freq, axis = ops.vision_rope_axes(head_dim, 10000.0)
    inv = vn.rope_inv_freq(head_dim // 2, 10000.0).astype(np.float32)
    np.testing.assert_array_equal(freq, np.concatenate([inv, inv]))
    np.testing.assert_array_equal(axis, [0] * 20 + [1] * 20)
    grids = [(2, 8, 12), (1, 6, 4)]
    coords = np.concatenate([vn.patch_coords(g, 2) for g in grids]).T.astype(np.int32).copy()  # [2, N]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((coords.shape[1], 2, head_dim)).astype(np.float32)
    ref = vn.rope_neox(x.astype(np.float64), vn.vision_rope_angles(grids, 2, head_dim))
    np.testing.assert_allclose(ops.rope_apply(x, freq, axis, coords), ref, rtol=1e-5, atol=1e-5)


def test_rotation_bad_input():
    with pytest.raises(ValueError, match="sum to head_dim/2"):
        ops.mrope_axes(16, 1e6, (2, 3, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.vision_rope_axes(18)
    freq, axis = ops.mrope_axes(16, 1e6, (2, 3, 3))
    x = np.zeros((4, 2, 16), np.float32)
    with pytest.raises(ValueError, match="n_axes, n_tokens"):
        ops.rope_apply(x, freq, axis, np.zeros((3, 5), np.int32))
    with pytest.raises(ValueError, match="beyond the position rows"):
        ops.rope_apply(x, freq, axis, np.zeros((2, 4), np.int32))


# ----------------------------------------------------------------------------- M-RoPE positions

CASES = [  # media (kind, grid), seconds per grid of each video
    ([], []),
    ([("i", (1, 6, 4))], []),
    ([("v", (2, 8, 12))], [1.0]),
    ([("v", (6, 4, 4))], [0.5]),
    ([("v", (5, 4, 8)), ("i", (1, 4, 4))], [1 / 12]),
    ([("v", (3, 4, 4)), ("v", (4, 8, 4))], [2.0, 0.25]),
    ([("i", (1, 4, 4)), ("v", (9, 2, 2)), ("i", (1, 2, 6))], [2 / 24]),
]


def _prompt(media):
    kinds, grids = [vn.TEXT] * 4, []
    for kind, g in media:
        kinds += [vn.TEXT, vn.TEXT] + [vn.VIDEO if kind == "v" else vn.IMAGE] * (g[0] * g[1] * g[2] // 4)
        grids.append(g)
    return np.asarray(kinds + [vn.TEXT] * 3, np.uint8), grids


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("tps", [0.0, 2.0, 25.0])
@pytest.mark.parametrize("rule", ["max", "spatial"])
def test_mrope_positions_match_reference(case, tps, rule):
    media, spg = CASES[case]
    kinds, grids = _prompt(media)
    pos, delta = ops.mrope_positions(kinds, grids, 2, spg, tps, rule)
    ref, ref_delta = vn.mrope_positions(kinds, grids, 2, seconds_per_grid=spg if tps else None,
                                        tokens_per_second=tps or None, text_after=rule)
    np.testing.assert_array_equal(pos, ref)
    assert delta == ref_delta


def test_mrope_positions_bad_input():
    kinds, grids = _prompt([("v", (2, 4, 4))])
    with pytest.raises(ValueError, match="8 tokens for a grid that needs 12"):
        ops.mrope_positions(kinds, [(3, 4, 4)])
    with pytest.raises(ValueError, match="fewer media runs"):
        ops.mrope_positions(kinds, grids + [(1, 2, 2)])
    with pytest.raises(ValueError, match="more media runs"):
        ops.mrope_positions(kinds, [])
    with pytest.raises(ValueError, match="not divisible"):
        ops.mrope_positions(kinds, [(2, 3, 4)])
    with pytest.raises(ValueError, match="fewer seconds_per_grid"):
        ops.mrope_positions(kinds, grids, 2, [], 2.0)
    with pytest.raises(ValueError, match="text_after"):
        ops.mrope_positions(kinds, grids, text_after="middle")
    with pytest.raises(ValueError, match="token kinds"):
        ops.mrope_positions(np.array([0, 3], np.uint8), [])


# ----------------------------------------------------------------------------- Qwen ViT layouts

@pytest.mark.parametrize("frames", [1, 2])
def test_qwen_patch_rows_match_reference(frames):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((frames, 3, 56, 84)).astype(np.float32)
    pair = np.concatenate([x, x]) if frames == 1 else x  # an image enters the ViT as a pair of itself
    got = ops.qwen_patch_rows(pair, 14, 2)
    ref, grid = vn.qwen_patchify(x)
    assert grid == (1, 4, 6)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    with pytest.raises(ValueError, match="multiple of patch"):
        ops.qwen_patch_rows(x[:, :, :42], 14, 2)


def test_qwen_patch_coords_match_reference():
    got = ops.qwen_patch_coords(6, 10, 2)
    np.testing.assert_array_equal(got.T, vn.patch_coords((1, 6, 10), 2))
    with pytest.raises(ValueError):
        ops.qwen_patch_coords(5, 10, 2)


@pytest.mark.parametrize("h,w,cells", [(6, 10, 2), (16, 16, 4), (12, 20, 4), (4, 6, 4), (36, 48, 4)])
def test_qwen_windows_match_reference_and_transformers(h, w, cells):
    import torch
    from transformers.vision_utils import get_vision_window_index

    window_of_token, unit_order, window_tokens = ops.qwen_windows(h, w, 2, cells)
    np.testing.assert_array_equal(window_of_token, vn.window_ids([(1, h, w)], 2, cells))
    index, cu = get_vision_window_index(torch.tensor([[1, h, w]]), spatial_merge_size=2, window_size=cells * 28,
                                        patch_size=14)
    np.testing.assert_array_equal(unit_order, index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(window_tokens)]), cu.numpy())
    # Reordering merge units window by window makes every window a contiguous segment.
    reordered = window_of_token.reshape(-1, 4)[unit_order].ravel()
    bounds = np.cumsum(window_tokens)
    assert all(len(set(seg)) == 1 for seg in np.split(reordered, bounds[:-1]))


def test_qwen_windows_bad_input():
    with pytest.raises(ValueError):
        ops.qwen_windows(6, 10, 2, 0)
    with pytest.raises(ValueError):
        ops.qwen_windows(7, 10, 2, 4)


# ----------------------------------------------------------------------------- pixel shuffle

@pytest.mark.parametrize("side,scale", [(4, 2), (8, 4), (12, 3), (26, 2), (32, 4)])
def test_pixel_shuffle_matches_reference(side, scale):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((side * side, 5)).astype(np.float32)
    np.testing.assert_array_equal(ops.pixel_shuffle(x, scale), vn.pixel_shuffle(x[None], scale)[0])


def test_pixel_shuffle_matches_transformers():
    import torch
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = np.random.default_rng(4).standard_normal((64, 6)).astype(np.float32)
    ref = Idefics3Connector.pixel_shuffle(None, torch.from_numpy(x)[None], 4)[0].numpy()
    np.testing.assert_array_equal(ops.pixel_shuffle(x, 4), ref)
    with pytest.raises(ValueError, match="square"):
        ops.pixel_shuffle(x[:60], 2)
    with pytest.raises(ValueError, match="multiple of scale"):
        ops.pixel_shuffle(x, 3)
