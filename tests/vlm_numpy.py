"""NumPy references for the Qwen2-VL / Qwen2.5-VL / Idefics3 / SmolVLM / InternVL pieces, written from the models'
definitions (papers, model cards, the processors' documented behaviour), not from llama.cpp.

They run in float64 on the HF checkpoints' own tensors (names as transformers saves them) and are
the ground truth for the C++ ops: tests/test_vlm_refs.py checks each one against transformers on
the tiny checkpoints of tests/vlm_refs.py, with the tolerances stated there.

Conventions: token-major arrays, shapes in comments; positions are int64; a "grid" is the
(t, h, w) patch grid of one image or video *before* the spatial merge (what the HF processors call
image_grid_thw / video_grid_thw); "merged" grids are divided by the merge size.

Pieces
  M-RoPE       mrope_positions (Qwen2-VL get_rope_index semantics, both text-after-media rules),
               mrope_angles + rope_neox (the rotation with rope sections).
  Qwen ViT     smart_resize, qwen_patchify (pixel rows in merge-window order), vision_rope_angles,
               window_ids (Qwen2.5 window attention as a mask), qwen_vision_forward.
  Idefics3     pixel_shuffle, idefics3_vision_forward (SigLIP tower + connector).
  InternVL     internvl_vision_forward (InternViT + pixel shuffle + projector).
  LLMs         llm_forward (Qwen2 with M-RoPE or Llama with 1-D RoPE) on input embeddings.
  Prompts      qwen_media_tokens, smolvlm_video_prompt, internvl_video_text: the placeholder layouts.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2  # token modality, as Qwen's mm_token_type_ids


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory's model.safetensors as float64 numpy arrays."""
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}


# ----------------------------------------------------------------------------- elementwise pieces

def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def silu(x):
    return x / (1.0 + np.exp(-x))


def linear(x, sd, name, bias=True):
    y = x @ sd[name + ".weight"].T
    if bias and (name + ".bias") in sd:
        y = y + sd[name + ".bias"]
    return y


def attention(q, k, v, allowed):
    """Softmax attention. q [n, H, d], k/v [m, Hkv, d] (GQA: H a multiple of Hkv), allowed [n, m] bool -> [n, H*d]."""
    n, n_head, d = q.shape
    rep = n_head // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    scores = np.einsum("nhd,mhd->hnm", q, k) / math.sqrt(d)  # [H, n, m]
    scores = np.where(allowed[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hnm,mhd->nhd", p, v).reshape(n, n_head * d)


def rope_neox(x, angles):
    """Rotate pairs (i, i + d/2) of x [n, H, d] by angles [n, d/2] (GPT-NeoX / HF rotate_half order)."""
    half = x.shape[-1] // 2
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2, rounded through float32 as every runtime stores it."""
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------- M-RoPE (Qwen2-VL, Qwen2.5-VL)

def mrope_positions(token_types, grids, spatial_merge: int, *, seconds_per_grid=None, tokens_per_second=None,
                    text_after: str = "max"):
    """3-D rope positions [3, n] (rows t, h, w) of one prompt, and the decode delta.

    token_types [n]: TEXT / IMAGE / VIDEO per token; each maximal run of IMAGE (VIDEO) tokens is one
    image (video) and takes the next grid (t, h, w) from `grids` (images and videos in prompt order;
    the run must hold t * h * w / merge^2 tokens).

    A text token at running position p gets (p, p, p). A media run starting at running position s
    gets, for merged cell (ti, hi, wi) in t-major raster order: (s + T(ti), s + hi, s + wi), where
    T(ti) = ti for images and Qwen2-VL videos, and trunc(ti * tokens_per_second * seconds_per_grid)
    for Qwen2.5-VL videos (seconds_per_grid = temporal_patch / fps of the sampled frames; computed
    in float32 as transformers does). After the run, text continues at
      text_after="max":     1 + the largest position the run used (Qwen's original rule, the one
                            the released checkpoints were trained with; vLLM uses it too);
      text_after="spatial": s + max(h, w) / merge (transformers >= 5.x; llama.cpp's mtmd per image).
    They agree for images, and for videos while T(last) < max(h, w) / merge.

    Returns (positions [3, n] int64, delta) with delta = max position + 1 - n: a generated token at
    sequence index i (>= n) gets position i + delta on all three axes.
    """
    if text_after not in ("max", "spatial"):
        raise ValueError(text_after)
    token_types = np.asarray(token_types)
    n = len(token_types)
    pos = np.zeros((3, n), dtype=np.int64)
    grids = list(grids)
    spg = list(seconds_per_grid) if seconds_per_grid is not None else None
    n_videos = 0
    cur = 0
    i = 0
    while i < n:
        kind = token_types[i]
        j = i
        while j < n and token_types[j] == kind:
            j += 1
        if kind == TEXT:
            pos[:, i:j] = cur + np.arange(j - i)
            cur += j - i
        else:
            if not grids:
                raise ValueError("more media runs in the prompt than grids")
            t, h, w = grids.pop(0)
            gh, gw = h // spatial_merge, w // spatial_merge
            if (j - i) != t * gh * gw:
                raise ValueError(f"media run of {j - i} tokens for grid {(t, h, w)} (needs {t * gh * gw})")
            ti = np.arange(t, dtype=np.int64)
            if kind == VIDEO and tokens_per_second is not None:
                interval = np.float32(tokens_per_second) * np.float32(spg[n_videos])
                ti = (ti.astype(np.float32) * interval).astype(np.int64)  # truncation toward zero
            if kind == VIDEO:
                n_videos += 1
            tt, hh, ww = np.meshgrid(ti, np.arange(gh), np.arange(gw), indexing="ij")
            pos[0, i:j] = cur + tt.ravel()
            pos[1, i:j] = cur + hh.ravel()
            pos[2, i:j] = cur + ww.ravel()
            cur = int(pos[:, i:j].max()) + 1 if text_after == "max" else cur + max(gh, gw)
        i = j
    if grids:
        raise ValueError(f"{len(grids)} grid(s) left over: fewer media runs than grids")
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


def mrope_angles(pos3, head_dim: int, theta: float, sections) -> np.ndarray:
    """Rotation angles [n, head_dim/2] for 3-D positions pos3 [3, n].

    Frequency pair i (inv_freq theta^(-2i/head_dim)) takes its position from axis a(i), where
    `sections` = (s_t, s_h, s_w), s_t + s_h + s_w = head_dim/2, splits the pairs into consecutive
    runs: pairs [0, s_t) use t, [s_t, s_t + s_h) use h, the rest w. With t = h = w (text) this is
    plain 1-D RoPE.
    """
    sections = list(sections)
    if sum(sections) != head_dim // 2 or len(sections) != 3:
        raise ValueError(f"rope sections {sections} must be 3 numbers summing to head_dim/2 = {head_dim // 2}")
    axis = np.repeat(np.arange(3), sections)  # [head_dim/2]
    inv = rope_inv_freq(head_dim, theta)
    # Angles are products of a float32 position and a float32 frequency in every runtime.
    p = np.asarray(pos3, dtype=np.float64)[axis].T  # [n, head_dim/2]
    return (p.astype(np.float32) * inv.astype(np.float32)).astype(np.float64)


# ----------------------------------------------------------------------------- Qwen ViT preprocessing

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen's resize target: both sides multiples of `factor` (patch * merge), area within
    [min_pixels, max_pixels], aspect ratio kept as far as that allows.

    Round each side to the nearest multiple (Python's round: halves to even); if the area is too
    large, scale both sides by sqrt(area / max_pixels) and round *down* (at least one factor); if too
    small, scale by sqrt(min_pixels / area) and round *up*. Aspect ratios over 200 are refused.
    """
    if min(height, width) <= 0 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"unsupported image size {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_patchify(frames, patch: int = 14, temporal: int = 2, merge: int = 2):
    """Pixel rows of a frame sequence, as the Qwen ViT consumes them.

    frames [T, C, H, W] (normalized; H, W multiples of patch * merge; an image is T = 1). Frames
    are grouped in time by `temporal` (the last frame repeated to fill the final group); each row
    is one (temporal group, patch) with features ordered (channel, frame-in-group, py, px); rows are
    ordered t-major, then by merge window (2x2 patches that the merger fuses are consecutive),
    then (row, col) inside the window. Returns (rows [t*h*w, C*temporal*patch^2], (t, h, w)).
    """
    frames = np.asarray(frames)
    n, c, height, width = frames.shape
    if height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"{height}x{width} is not a multiple of {patch * merge}")
    if n % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - n % temporal, axis=0)])
    t, h, w = frames.shape[0] // temporal, height // patch, width // patch
    x = frames.reshape(t, temporal, c, h // merge, merge, patch, w // merge, merge, patch)
    # -> [t, h/m, w/m, m(row), m(col), C, temporal, patch(y), patch(x)]
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * temporal * patch * patch), (t, h, w)


def patch_coords(grid, merge: int):
    """(h, w) patch coordinates [t*h*w, 2] of qwen_patchify's rows (merge-window order, repeated per t)."""
    t, h, w = grid
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blk = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([blk(hh), blk(ww)], axis=1), (t, 1))


def vision_rope_angles(grids, merge: int, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """2-D rotary angles [N, head_dim/2] of the ViT tokens: the first head_dim/4 pairs rotate by the
    patch row (frequencies theta^(-2i/(head_dim/2))), the next head_dim/4 by the patch column."""
    inv = rope_inv_freq(head_dim // 2, theta)
    coords = np.concatenate([patch_coords(g, merge) for g in grids]).astype(np.float32)
    inv = inv.astype(np.float32)
    return np.concatenate([coords[:, :1] * inv, coords[:, 1:] * inv], axis=1).astype(np.float64)


def frame_ids(grids) -> np.ndarray:
    """Per ViT token, the (image/video, temporal patch) it belongs to: full attention stays inside one."""
    ids, base = [], 0
    for t, h, w in grids:
        ids.append(base + np.repeat(np.arange(t), h * w))
        base += t
    return np.concatenate(ids)


def window_ids(grids, merge: int, window_merged: int) -> np.ndarray:
    """Qwen2.5-VL window of each ViT token (rows in qwen_patchify order).

    The merged grid of every temporal patch is tiled from its top-left corner into windows of
    window_merged x window_merged merged cells (window_size / (patch * merge); the last row/column
    of windows may be partial). Window attention lets a token attend only within its window.
    """
    ids, base = [], 0
    for t, h, w in grids:
        coords = patch_coords((1, h, w), merge) // merge // window_merged  # window (row, col)
        n_win_w = -(-(w // merge) // window_merged)
        n_win_h = -(-(h // merge) // window_merged)
        per_frame = coords[:, 0] * n_win_w + coords[:, 1]
        ids.append(np.concatenate([base + f * n_win_h * n_win_w + per_frame for f in range(t)]))
        base += t * n_win_h * n_win_w
    return np.concatenate(ids)


def qwen_vision_forward(sd, cfg: dict, rows, grids, *, prefix: str = "visual.", return_hidden: bool = False):
    """Qwen2-VL / Qwen2.5-VL vision tower + merger on pixel rows [N, C*tp*p*p] -> [N / merge^2, out].

    cfg: the checkpoint's vision_config (Qwen2-VL names depth/embed_dim/num_heads, Qwen2.5-VL adds
    fullatt_block_indexes/window_size). Patch embedding: one matmul with the Conv3D kernel
    flattened to [width, C*tp*p*p] (the same as summing two 2-D convolutions, one per frame of the
    temporal pair). Blocks: x += attn(norm1(x)); x += mlp(norm2(x)), with 2-D rotary on q and k.
    Qwen2-VL: LayerNorm (eps 1e-6), fc1 -> quick_gelu -> fc2, full attention within each temporal
    patch in every block. Qwen2.5-VL: RMSNorm (eps 1e-6), down(silu(gate(x)) * up(x)), window
    attention except in fullatt_block_indexes. Merger: norm (LayerNorm / RMSNorm), every merge^2
    consecutive rows concatenated, Linear -> GELU(erf) -> Linear.
    """
    v25 = "fullatt_block_indexes" in cfg
    merge = cfg["spatial_merge_size"]
    n_head = cfg["num_heads"]
    x = rows @ sd[prefix + "patch_embed.proj.weight"].reshape(sd[prefix + "patch_embed.proj.weight"].shape[0], -1).T
    n, width = x.shape
    head_dim = width // n_head
    angles = vision_rope_angles(grids, merge, head_dim)
    frames = frame_ids(grids)
    full = frames[:, None] == frames[None, :]
    if v25:
        win = window_ids(grids, merge, cfg["window_size"] // (cfg["patch_size"] * merge))
        windowed = win[:, None] == win[None, :]
    norm = (lambda z, p: rms_norm(z, sd[p + ".weight"], 1e-6)) if v25 else \
        (lambda z, p: layer_norm(z, sd[p + ".weight"], sd[p + ".bias"], 1e-6))
    for i in range(cfg["depth"]):
        b = f"{prefix}blocks.{i}."
        hs = norm(x, b + "norm1")
        qkv = linear(hs, sd, b + "attn.qkv").reshape(n, 3, n_head, head_dim)
        q, k, v = rope_neox(qkv[:, 0], angles), rope_neox(qkv[:, 1], angles), qkv[:, 2]
        allowed = windowed if v25 and i not in cfg["fullatt_block_indexes"] else full
        x = x + linear(attention(q, k, v, allowed), sd, b + "attn.proj")
        hs = norm(x, b + "norm2")
        if v25:
            hs = linear(silu(linear(hs, sd, b + "mlp.gate_proj")) * linear(hs, sd, b + "mlp.up_proj"),
                        sd, b + "mlp.down_proj")
        else:
            hs = linear(quick_gelu(linear(hs, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        x = x + hs
    hidden = x
    m = norm(x, prefix + "merger.ln_q").reshape(n // merge ** 2, width * merge ** 2)
    m = linear(gelu_erf(linear(m, sd, prefix + "merger.mlp.0")), sd, prefix + "merger.mlp.2")
    return (m, hidden) if return_hidden else m


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM

def pixel_shuffle(x, scale: int):
    """Space-to-depth of square token grids: x [B, s*s, C] -> [B, (s/scale)^2, C*scale^2].

    Output token (i, j) (raster order over the (s/scale)^2 grid) concatenates the input tokens
    (i*scale + dy, j*scale + dx) for dy, then dx, in row-major order: feature index
    (dy*scale + dx)*C + c.
    """
    b, seq, c = x.shape
    side = int(round(math.sqrt(seq)))
    if side * side != seq or side % scale:
        raise ValueError(f"{seq} tokens are not a square grid divisible by {scale}")
    g = side // scale
    x = x.reshape(b, g, scale, g, scale, c).transpose(0, 1, 3, 2, 4, 5)  # [B, i, j, dy, dx, C]
    return x.reshape(b, g * g, scale * scale * c)


def idefics3_vision_forward(sd, cfg: dict, images, scale: int, *, prefix: str = "model.",
                            return_hidden: bool = False):
    """SigLIP-style tower + pixel-shuffle connector on full (unpadded) images [B, 3, S, S] -> [B, tokens, n_embd].

    Patch conv (with bias) + learned position embedding (position i for patch i in raster order,
    the whole image being real), pre-norm encoder blocks (LayerNorm, q/k/v/out with biases,
    scale head_dim^-1/2, fc1 -> gelu_tanh -> fc2), post LayerNorm, then pixel_shuffle(scale) and a
    bias-free Linear (connector.modality_projection.proj).
    """
    vp = prefix + "vision_model."
    w = sd[vp + "embeddings.patch_embedding.weight"]  # [width, 3, p, p]
    width, p = w.shape[0], w.shape[-1]
    bsz, c, height, wid = images.shape
    gh, gw = height // p, wid // p
    patches = images.reshape(bsz, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(bsz, gh * gw, c * p * p)
    x = patches @ w.reshape(width, -1).T + sd[vp + "embeddings.patch_embedding.bias"]
    x = x + sd[vp + "embeddings.position_embedding.weight"][: gh * gw]
    n_head = cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-6)
    hd = width // n_head
    allowed = np.ones((gh * gw, gh * gw), dtype=bool)
    out = []
    for img in x:
        hcur = img
        for i in range(cfg["num_hidden_layers"]):
            b = f"{vp}encoder.layers.{i}."
            hs = layer_norm(hcur, sd[b + "layer_norm1.weight"], sd[b + "layer_norm1.bias"], eps)
            q = linear(hs, sd, b + "self_attn.q_proj").reshape(-1, n_head, hd)
            k = linear(hs, sd, b + "self_attn.k_proj").reshape(-1, n_head, hd)
            v = linear(hs, sd, b + "self_attn.v_proj").reshape(-1, n_head, hd)
            hcur = hcur + linear(attention(q, k, v, allowed), sd, b + "self_attn.out_proj")
            hs = layer_norm(hcur, sd[b + "layer_norm2.weight"], sd[b + "layer_norm2.bias"], eps)
            hcur = hcur + linear(gelu_tanh(linear(hs, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        out.append(layer_norm(hcur, sd[vp + "post_layernorm.weight"], sd[vp + "post_layernorm.bias"], eps))
    hidden = np.stack(out)
    proj = pixel_shuffle(hidden, scale) @ sd[prefix + "connector.modality_projection.proj.weight"].T
    return (proj, hidden) if return_hidden else proj


# ----------------------------------------------------------------------------- InternVL

def internvl_vision_forward(sd, cfg: dict, images, downsample_ratio: float = 0.5, *, prefix: str = "model.",
                            return_hidden: bool = False):
    """InternViT + pixel shuffle + projector on images [B, 3, S, S] (S the tower's size) -> [B, tokens, n_embd].

    Patch conv (with bias), a CLS token prepended, learned position embedding over CLS + patches;
    blocks x += lambda_1 * attn(LN1(x)); x += lambda_2 * fc2(gelu_erf(fc1(LN2(x)))) (q/k/v/out with
    biases, scale head_dim^-1/2, no q/k norm); no final norm (use_mean_pooling configs). The CLS row
    is dropped, the patch grid pixel-shuffled by 1/downsample_ratio (same order as Idefics3's), then
    LayerNorm (eps 1e-5) -> Linear -> GELU (erf) -> Linear.
    """
    vp = prefix + "vision_tower."
    w = sd[vp + "embeddings.patch_embeddings.projection.weight"]  # [width, 3, p, p]
    width, p = w.shape[0], w.shape[-1]
    bsz, c, height, wid = images.shape
    gh, gw = height // p, wid // p
    patches = images.reshape(bsz, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(bsz, gh * gw, c * p * p)
    x = patches @ w.reshape(width, -1).T + sd[vp + "embeddings.patch_embeddings.projection.bias"]
    cls = np.broadcast_to(sd[vp + "embeddings.cls_token"].reshape(1, 1, width), (bsz, 1, width))
    x = np.concatenate([cls, x], axis=1) + sd[vp + "embeddings.position_embeddings"].reshape(1, -1, width)
    n_head = cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-6)
    hd = width // n_head
    allowed = np.ones((gh * gw + 1, gh * gw + 1), dtype=bool)
    out = []
    for img in x:
        h = img
        for i in range(cfg["num_hidden_layers"]):
            b = f"{vp}encoder.layer.{i}."
            hs = layer_norm(h, sd[b + "layernorm_before.weight"], sd[b + "layernorm_before.bias"], eps)
            q = linear(hs, sd, b + "attention.q_proj").reshape(-1, n_head, hd)
            k = linear(hs, sd, b + "attention.k_proj").reshape(-1, n_head, hd)
            v = linear(hs, sd, b + "attention.v_proj").reshape(-1, n_head, hd)
            h = h + sd[b + "lambda_1"] * linear(attention(q, k, v, allowed), sd, b + "attention.projection_layer")
            hs = layer_norm(h, sd[b + "layernorm_after.weight"], sd[b + "layernorm_after.bias"], eps)
            h = h + sd[b + "lambda_2"] * linear(gelu_erf(linear(hs, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        out.append(h)
    hidden = np.stack(out)
    feats = pixel_shuffle(hidden[:, 1:], round(1 / downsample_ratio))
    mp = prefix + "multi_modal_projector."
    feats = layer_norm(feats, sd[mp + "layer_norm.weight"], sd[mp + "layer_norm.bias"], 1e-5)
    proj = linear(gelu_erf(linear(feats, sd, mp + "linear_1")), sd, mp + "linear_2")
    return (proj, hidden) if return_hidden else proj


# ----------------------------------------------------------------------------- LLMs

def llm_forward(sd, cfg: dict, embeds, positions, *, prefix: str, lm_head: str = "lm_head.weight"):
    """Decoder-only forward over input embeddings [n, n_embd] -> logits [n, vocab] (causal, no cache).

    positions: [3, n] for M-RoPE (cfg["rope_parameters"]["mrope_section"] gives the sections) or
    [n] for 1-D RoPE. Blocks: x += o(attn(rope(q), rope(k), v)); x += down(silu(gate) * up), RMSNorm
    before each and at the end; q/k/v biases when the checkpoint has them (Qwen2).
    """
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    width = cfg["hidden_size"]
    hd = cfg.get("head_dim") or width // n_head
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    eps = cfg["rms_norm_eps"]
    positions = np.asarray(positions)
    if positions.ndim == 2:
        angles = mrope_angles(positions, hd, theta, rp["mrope_section"])
    else:
        inv = rope_inv_freq(hd, theta).astype(np.float32)
        angles = (positions.astype(np.float32)[:, None] * inv).astype(np.float64)
    n = embeds.shape[0]
    causal = np.tril(np.ones((n, n), dtype=bool))
    x = np.asarray(embeds, dtype=np.float64)
    for i in range(cfg["num_hidden_layers"]):
        b = f"{prefix}layers.{i}."
        hs = rms_norm(x, sd[b + "input_layernorm.weight"], eps)
        q = rope_neox(linear(hs, sd, b + "self_attn.q_proj").reshape(n, n_head, hd), angles)
        k = rope_neox(linear(hs, sd, b + "self_attn.k_proj").reshape(n, n_kv, hd), angles)
        v = linear(hs, sd, b + "self_attn.v_proj").reshape(n, n_kv, hd)
        x = x + linear(attention(q, k, v, causal), sd, b + "self_attn.o_proj", bias=False)
        hs = rms_norm(x, sd[b + "post_attention_layernorm.weight"], eps)
        x = x + linear(silu(linear(hs, sd, b + "mlp.gate_proj", bias=False)) * linear(hs, sd, b + "mlp.up_proj", bias=False),
                       sd, b + "mlp.down_proj", bias=False)
    x = rms_norm(x, sd[prefix + "norm.weight"], eps)
    return x @ sd[lm_head].T


# ----------------------------------------------------------------------------- prompt layouts

def qwen_media_tokens(token_ids: dict, grid, merge: int, kind: str = "video") -> list[int]:
    """<|vision_start|> + one <|video_pad|> (<|image_pad|>) per merged cell (t*h*w/merge^2) + <|vision_end|>."""
    t, h, w = grid
    pad = token_ids["<|video_pad|>" if kind == "video" else "<|image_pad|>"]
    return [token_ids["<|vision_start|>"]] + [pad] * (t * h * w // merge ** 2) + [token_ids["<|vision_end|>"]]


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English cardinal as num2words writes it (SmolVLM's frame count): 21 -> "twenty-one",
    123 -> "one hundred and twenty-three"; 0 <= n < 1000."""
    if not 0 <= n < 1000:
        raise ValueError(f"{n} is outside 0..999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    rest = n % 100
    return _ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")


def smolvlm_video_text(timestamps_s, duration_s: float, tokens_per_frame: int) -> str:
    """What SmolVLM2's processor puts in place of one <video> placeholder.

    "You are provided the following series of {N in words} frames from a {H:MM:SS} [H:MM:SS]
    video.\n", then per frame "\nFrame from {MM:SS}:" + "<fake_token_around_image><global-img>"
    + "<image>" * tokens_per_frame + "<fake_token_around_image>", then "\n\n". Timestamps are
    the sampled frames' times in seconds (MM = whole minutes, SS = whole seconds % 60); video
    frames are never split into tiles (one global view per frame).
    """
    d = int(duration_s)
    text = (f"You are provided the following series of {number_words(len(timestamps_s))} frames from a "
            f"{d // 3600}:{d % 3600 // 60:02d}:{d % 60:02d} [H:MM:SS] video.\n")
    for ts in timestamps_s:
        text += (f"\nFrame from {int(ts // 60):02d}:{int(ts % 60):02d}:"
                 "<fake_token_around_image><global-img>" + "<image>" * tokens_per_frame + "<fake_token_around_image>")
    return text + "\n\n"


def smolvlm_video_prompt(timestamps_s, duration_s: float, tokens_per_frame: int, question: str) -> str:
    """A whole single-turn SmolVLM2 video prompt: the chat template's "<|im_start|>User: <video>{question}
    <end_of_utterance>\nAssistant:" with <video> expanded by smolvlm_video_text."""
    return ("<|im_start|>User: " + smolvlm_video_text(timestamps_s, duration_s, tokens_per_frame) + question
            + "<end_of_utterance>\nAssistant:")


def internvl_video_text(n_frames: int, tokens_per_frame: int) -> str:
    """What InternVL's processor puts in place of one <video> placeholder: "Frame{i}: <img>" +
    "<IMG_CONTEXT>" * tokens_per_frame + "</img>" per frame (i from 1), joined by newlines."""
    return "\n".join(f"Frame{i + 1}: <img>" + "<IMG_CONTEXT>" * tokens_per_frame + "</img>" for i in range(n_frames))
