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


def _write_tokenizer(tok, out: Path, *, bos: str | None, add_bos: bool) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + [USER_TOKEN]}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t != USER_TOKEN}
        for t in SPECIAL_TOKENS + [USER_TOKEN]
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
        "chat_template": CHATML_TEMPLATE,
    }
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
