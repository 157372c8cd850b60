"""Tiny random Hugging Face checkpoints, built offline, for converter and runtime tests.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a small
generated corpus, and the weights are seeded random numbers. Each builder writes a
directory that looks like a real HF checkpoint (config.json, *.safetensors,
tokenizer.json, tokenizer_config.json) and returns its path.

    make_tiny_llama(dir)   LlamaForCausalLM, SmolLM2-style tokenizer (Digits + ByteLevel),
                           untied lm_head, specials at the start of the vocab.
    make_tiny_qwen2(dir)   Qwen2ForCausalLM, Qwen2-style tokenizer (Split regex + ByteLevel),
                           tied embeddings, random q/k/v biases, specials appended after the
                           BPE vocab and config vocab_size padded past the tokenizer.
    make_tiny_llava_onevision(dir)  LlavaOnevisionForConditionalGeneration: SigLIP 70px/14 (5x5 grid,
                           pooled to 3x3) + Qwen2 as above with <image>/<video> specials,
                           processor chat_template.json and video_preprocessor_config.json;
                           layout="saved" | "hub" | "state_dict" picks the tensor names.
    make_tiny_videoxl(dir) Video-XL (LlavaQwenForCausalLM), written by hand with the real
                           checkpoint's names: Qwen2 + beacon q/k/v + CLIP 56px/14 (3 layers)
                           + mm_projector, slow Qwen2 tokenizer files, tower config folder.

Keyword overrides go into the model config (e.g. ``intermediate_size=80``); the
extra keywords ``dtype`` (a torch dtype for the saved weights) and ``max_shard_size``
(e.g. ``"200KB"`` to get a sharded checkpoint with model.safetensors.index.json) control
how it is saved.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A non-special added token (llama.cpp type USER_DEFINED), as Qwen2.5 has.
USER_TOKEN = "<tool_call>"

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB = 640  # trained BPE size before added tokens (256 byte symbols + merges)

_WORDS = (
    "the model reads a long video and answers questions about what happens in each "
    "scene while the cache keeps only the tokens that matter for the next frame "
    "people walk into the kitchen and open the fridge then a cat jumps on the table "
    "quickly before anyone notices because it wants the fish that was left there"
).split()

_CODE = [
    "def forward(self, x):\n    return self.proj(x) + x\n",
    "for i in range(10):\n    print(i * 2)\n",
    "if (n > 0) { total += n; } else { return -1; }\n",
    "import numpy as np\narr = np.zeros((4, 8), dtype=np.float32)\n",
    "class Cache:\n    def __init__(self, size):\n        self.size = size\n",
    "while (queue.size() > 0) { auto x = queue.pop(); }\n",
]


def _corpus() -> list[str]:
    """Deterministic English + code + digits text, a few hundred lines."""
    lines = []
    n = len(_WORDS)
    for i in range(300):
        # Walk the word list with different strides so pairs repeat but vary.
        words = [_WORDS[(i * 7 + j * (1 + i % 5)) % n] for j in range(6 + i % 9)]
        sentence = " ".join(words).capitalize()
        lines.append(f"{sentence}. Frame {i * 37 % 1000} at {i % 60}:{(i * 13) % 60:02d}, score {i * 0.25:.2f}!")
        lines.append(_CODE[i % len(_CODE)])
    lines.append("It's 2024; we'll see they're done, I've got it, you'd know.")
    return lines


def _train_tokenizer(style: str):
    """Train a byte-level BPE with the pre-tokenizer of SmolLM2 ("smollm") or Qwen2 ("qwen2")."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        specials_in_trainer = SPECIAL_TOKENS  # SmolLM keeps its specials at ids 0..N
    elif style == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        specials_in_trainer = []  # Qwen2 appends its specials after the BPE vocab
    else:
        raise ValueError(style)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB + len(specials_in_trainer),
        special_tokens=specials_in_trainer,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    return tok


def _write_tokenizer(tok, out: Path, *, bos: str | None, add_bos: bool, extra_special: tuple[str, ...] = (),
                     chat_template: str = CHATML_TEMPLATE, slow: bool = False) -> dict[str, int]:
    """Write the tokenizer files; returns {token: id} for the added tokens.

    slow=True writes a slow Qwen2Tokenizer's files (vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json) instead of tokenizer.json, as Video-XL's checkpoint has them.
    """
    names = SPECIAL_TOKENS + [USER_TOKEN] + list(extra_special)
    ids = {t: tok.token_to_id(t) for t in names}
    if slow:
        tok.model.save(str(out))  # vocab.json + merges.txt
        (out / "added_tokens.json").write_text(json.dumps({t: ids[t] for t in names}, indent=2))
        (out / "special_tokens_map.json").write_text(json.dumps(
            {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
             "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2))
    else:
        tok.save(str(out / "tokenizer.json"))
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t != USER_TOKEN}
        for t in names
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "bos_token": bos,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": chat_template,
    }
    if slow:
        cfg.update(tokenizer_class="Qwen2Tokenizer", errors="replace", split_special_tokens=False)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return ids


def _randomize(model, seed: int) -> None:
    """Large-ish random weights so logits are far from flat and any mapping slip shows up.

    Norm weights are drawn around 1 (not left at exactly 1) so swapping attn_norm and
    ffn_norm, or dropping a norm, changes the output.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.2 * noise)


def _make(kind: str, out_dir, seed: int, overrides: dict) -> Path:
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = overrides.pop("dtype", torch.float32)
    max_shard_size = overrides.pop("max_shard_size", None)

    tok = _train_tokenizer("smollm" if kind == "llama" else "qwen2")
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if kind == "llama":
        ids = _write_tokenizer(tok, out, bos="<|im_start|>", add_bos=True)
        vocab_size = n_tok
    else:
        ids = _write_tokenizer(tok, out, bos=None, add_bos=False)
        vocab_size = (n_tok + 63) // 64 * 64  # Qwen pads its embedding past the tokenizer

    cfg = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=256,
        rms_norm_eps=1e-5, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    if kind == "llama":
        cfg.update(bos_token_id=ids["<|im_start|>"], tie_word_embeddings=False)
        cfg.update(overrides)
        config = transformers.LlamaConfig(**cfg)
        model = transformers.LlamaForCausalLM(config)
    else:
        cfg.update(bos_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
        cfg.update(overrides)
        config = transformers.Qwen2Config(**cfg)
        model = transformers.Qwen2ForCausalLM(config)

    _randomize(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    transformers.utils.logging.disable_progress_bar()  # keep test output quiet
    model.save_pretrained(out, **kwargs)
    return out


def make_tiny_llama(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny LlamaForCausalLM checkpoint (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    return _make("llama", out_dir, seed, dict(overrides))


def make_tiny_qwen2(out_dir, seed: int = 0, **overrides) -> Path:
    """Tiny Qwen2ForCausalLM checkpoint (hidden 64, 2 layers, 4 heads, 2 KV heads, tied)."""
    return _make("qwen2", out_dir, seed, dict(overrides))


if __name__ == "__main__":  # handy for poking at a checkpoint by hand
    import sys

    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny")
    for path in (make_tiny_llama(dest / "llama"), make_tiny_qwen2(dest / "qwen2")):
        print(path, sorted(p.name for p in path.iterdir()))


# ----------------------------------------------------------------------------- multimodal models

# A simplified llava-hf processor template (chat_template.json): media placeholders first, then text.
LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2-Instruct's template (ChatML + default system prompt), as in Video-XL's tokenizer_config.json.
QWEN2_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _save_safetensors(tensors: dict, path: Path, dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def make_tiny_llava_onevision(out_dir, seed: int = 0, layout: str = "saved", **overrides) -> Path:
    """Tiny LlavaOnevisionForConditionalGeneration (SigLIP 70px/14 -> 5x5 grid, pooled to 3x3; Qwen2 LLM).

    SigLIP: hidden 32, 2 layers, 2 heads, MLP 64, no pooling head. LLM: as make_tiny_qwen2
    (hidden 64, tied), tokenizer with <image> and <video> specials. Writes the processor's
    chat_template.json and video_preprocessor_config.json / preprocessor_config.json too.

    layout: "saved" = what transformers 5 save_pretrained writes (vision_tower.* without
    vision_model.); "hub" = the hub's transformers-4 names (vision_tower.vision_model.*);
    "state_dict" = the in-memory names (model.language_model.*, model.vision_tower.*, ...).
    Overrides go into the top-level config; ``vision_config`` / ``text_config`` dicts are
    merged into those sub-configs; ``dtype`` sets the saved weights' dtype.
    """
    import torch
    import transformers
    from tokenizers import AddedToken

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides)
    dtype = overrides.pop("dtype", torch.float32)
    vision_over, text_over = overrides.pop("vision_config", {}), overrides.pop("text_config", {})

    tok = _train_tokenizer("qwen2")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")])
    ids = _write_tokenizer(tok, out, bos=None, add_bos=False, extra_special=("<image>", "<video>"))
    vocab_size = (tok.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_OV_TEMPLATE}, indent=2))

    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=70, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
    vision.update(vision_over)
    text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-6,
                eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True)
    text.update(text_over)
    top = dict(image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-1,
               vision_feature_select_strategy="full", tie_word_embeddings=text["tie_word_embeddings"])
    top.update(overrides)
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, **top)
    model = transformers.LlavaOnevisionForConditionalGeneration(config)
    _randomize(model, seed)
    transformers.utils.logging.disable_progress_bar()
    model.to(dtype).save_pretrained(out)

    if layout != "saved":
        from safetensors.torch import load_file

        if layout == "hub":
            saved = load_file(out / "model.safetensors")
            renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                        if k.startswith("vision_tower.") else k): v for k, v in saved.items()}
        elif layout == "state_dict":
            renamed = dict(model.state_dict())
            if text["tie_word_embeddings"]:
                renamed.pop("lm_head.weight")
        else:
            raise ValueError(layout)
        _save_safetensors(renamed, out / "model.safetensors", dtype)

    size = vision["image_size"]
    pre = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
           "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
           "processor_class": "LlavaOnevisionProcessor"}
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        dict(pre, video_processor_type="LlavaOnevisionVideoProcessor"), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(
        dict(pre, image_processor_type="LlavaOnevisionImageProcessor", do_pad=True,
             image_grid_pinpoints=[[size, size], [size, 2 * size], [2 * size, size]]), indent=2))
    return out


def make_tiny_videoxl(out_dir, seed: int = 0, select_layer: int | None = -2, **overrides) -> Path:
    """Tiny Video-XL checkpoint (LlavaQwenForCausalLM), written by hand: no transformers class exists.

    Tensor names are exactly those of the real checkpoint (../shared/VIDEOXL.md section 2):
    Qwen2 LLM under model. + untied lm_head (hidden 64, 2 layers, 4 heads, 2 KV heads), beacon
    (VST) q/k/v projections per layer + model.beacon_embed_tokens, a CLIP tower (hidden 32,
    3 layers, 2 heads, MLP 64, 56px/14 -> 4x4 grid + CLS, quick_gelu) under
    model.vision_tower.vision_tower.vision_model., and model.mm_projector.{0,2}.

    As in the real files, the tokenizer is a slow Qwen2Tokenizer (vocab.json, merges.txt,
    added_tokens.json, no tokenizer.json), and mm_vision_tower is the trainer's absolute path,
    which does not exist here; the tower's config.json and preprocessor_config.json are
    placed in HF_DIR/<its last path component>/.

    select_layer=None leaves mm_vision_select_layer out of config.json. num_attention_heads,
    num_key_value_heads and num_hidden_layers reshape the LLM; other keyword overrides update
    config.json (``dtype`` sets the saved weights' dtype, ``beacon=False`` omits the beacon tensors).
    """
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides)
    dtype = overrides.pop("dtype", torch.float32)
    with_beacon = overrides.pop("beacon", True)
    # LLM shape overrides go to the Qwen2 config (and from there to config.json).
    llm_shape = {k: overrides.pop(k) for k in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers")
                 if k in overrides}

    tok = _train_tokenizer("qwen2")
    ids = _write_tokenizer(tok, out, bos=None, add_bos=False, chat_template=QWEN2_INSTRUCT_TEMPLATE, slow=True)
    vocab_size = (tok.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64

    qcfg = transformers.Qwen2Config(**{
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": vocab_size, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "eos_token_id": ids["<|im_end|>"], "bos_token_id": ids["<|endoftext|>"],
        **llm_shape})
    llm = transformers.Qwen2ForCausalLM(qcfg)
    _randomize(llm, seed)
    ccfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
        patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
    clip = transformers.CLIPVisionModel(ccfg)
    _randomize(clip, seed + 1)

    gen = torch.Generator().manual_seed(seed + 2)

    def rand(*shape, scale=0.2):
        return scale * torch.randn(shape, generator=gen, dtype=torch.float32)

    sd = dict(llm.state_dict())
    vis = "model.vision_tower.vision_tower.vision_model."
    sd.update({vis + k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")})
    H, W = qcfg.hidden_size, ccfg.hidden_size
    sd.update({"model.mm_projector.0.weight": rand(H, W), "model.mm_projector.0.bias": rand(H, scale=0.5),
               "model.mm_projector.2.weight": rand(H, H), "model.mm_projector.2.bias": rand(H, scale=0.5)})
    if with_beacon:
        sd["model.beacon_embed_tokens.weight"] = rand(1, H)
        for i in range(qcfg.num_hidden_layers):
            for k in "qkv":
                w = sd[f"model.layers.{i}.self_attn.{k}_proj.weight"]
                sd[f"model.layers.{i}.self_attn.beacon_{k}_proj.weight"] = rand(*w.shape)
                sd[f"model.layers.{i}.self_attn.beacon_{k}_proj.bias"] = rand(w.shape[0], scale=0.5)
    _save_safetensors(sd, out / "model.safetensors", dtype)

    tower_path = "/share/x2l-tiny/clip-vit-tiny-patch14-56"  # the trainer's path: absent here
    tower_dir = out / tower_path.rsplit("/", 1)[-1]
    tower_dir.mkdir(exist_ok=True)
    (tower_dir / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 32,
         "vision_config": {k: v for k, v in ccfg.to_dict().items() if k in (
             "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
             "patch_size", "hidden_act", "layer_norm_eps", "projection_dim", "model_type")}}, indent=2))
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "do_convert_rgb": True,
         "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
         "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
         "rescale_factor": 1 / 255, "size": {"shortest_edge": 56}}, indent=2))

    cfg = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen",
        "hidden_size": H, "intermediate_size": qcfg.intermediate_size, "num_hidden_layers": qcfg.num_hidden_layers,
        "num_attention_heads": qcfg.num_attention_heads, "num_key_value_heads": qcfg.num_key_value_heads,
        "vocab_size": vocab_size, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 256, "max_window_layers": 2, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""), "transformers_version": "4.40.0.dev0",
        "mm_vision_tower": tower_path, "mm_hidden_size": W, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": select_layer, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "unires", "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[56, 56], [56, 112], [112, 56]], "mm_resampler_type": "spatial_pool",
        "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "average", "mm_spatial_pool_out_channels": W,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "unfreeze_mm_vision_tower": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "beacon_window": 1440, "beacon_stride": 1440, "beacon_ratio": [2, 4, 8], "beacon_ratio_mix": "step-random",
        "beacon_param": ["q", "k", "v"], "beacon_attn": "full-coverage", "beacon_attend_prev": True,
        "beacon_sink_size": 0, "beacon_pos": "interleave", "beacon_parallel_window": 1,
        "beacon_embed_init": "eos", "beacon_accum": True, "enable_beacon": True,
    }
    if select_layer is None:
        del cfg["mm_vision_select_layer"]
    cfg.update(overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
