#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint directory into one GGUF file.

    python tools/convert.py HF_DIR OUT.gguf --outtype {f32,f16,bf16,q8_0,q4_0,q4_1,q5_0} [--quiet]

or, from Python, ``convert(hf_dir, out_path, outtype="f16", progress=True)``.

HF_DIR holds config.json, *.safetensors (optionally sharded with
model.safetensors.index.json), tokenizer.json and tokenizer_config.json.

The output follows llama.cpp's names, metadata keys and tensor layouts, so llama.cpp
itself can load it (the tests check this with llama-cpp-python). Tensors are streamed:
safetensors headers are parsed up front, then each tensor is read from a memory map,
converted and written before the next one is touched, so peak memory is about one
tensor, not the model.

One handler class per Hugging Face architecture (see ``HANDLERS``) turns config.json
into GGUF metadata and HF tensor names into GGUF tensors. Multimodal models
(LLaVA-OneVision, Video-XL) are meant to be added as handlers that reuse
``LlamaLikeText`` for their language model under a different name prefix and add their
vision tower / projector / beacon tensors next to it.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:
    import gguf
except ImportError:  # reported as a ConvertError by convert(), not as a traceback
    gguf = None


class ConvertError(Exception):
    """A problem with the input checkpoint or the request; the message says what."""


# ----------------------------------------------------------------------------- helpers

def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None


def _require(config: dict, key: str, where: str = "config.json") -> Any:
    if config.get(key) is None:
        raise ConvertError(f"{where} is missing required key {key!r}")
    return config[key]


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- safetensors

@dataclass
class _StEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsCheckpoint:
    """Lazy read access to the tensors of one or more .safetensors files.

    We parse the (tiny) JSON headers ourselves and read each tensor through a memory
    map on demand. Compared with safetensors.safe_open(framework="numpy") this also
    handles BF16 (numpy has no bfloat16) without needing torch.
    """

    _ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

    def __init__(self, hf_dir: Path):
        self.entries: dict[str, _StEntry] = {}
        for file in self._weight_files(hf_dir):
            self._read_header(file)

    @staticmethod
    def _weight_files(hf_dir: Path) -> list[Path]:
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map") or {}
            files = sorted({hf_dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ConvertError(f"{index.name} lists shard(s) that are not in {hf_dir}: {', '.join(missing)}")
            return files
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not supported: re-save with safetensors)" \
                if any(hf_dir.glob("*.bin")) else ""
            raise ConvertError(f"no *.safetensors files in {hf_dir}{hint}")
        return files

    def _read_header(self, file: Path) -> None:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConvertError(f"{file.name} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConvertError(f"{file.name} has a corrupt safetensors header") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in self.entries:
                raise ConvertError(f"tensor {name!r} appears in both {self.entries[name].file.name} and {file.name}")
            begin, end = info["data_offsets"]
            self.entries[name] = _StEntry(file, info["dtype"], tuple(info["shape"]), base + begin, base + end)

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def load(self, name: str) -> np.ndarray:
        """Read one tensor as a fresh float32 array (the map is released right after)."""
        e = self.entries[name]
        if e.dtype not in self._ITEMSIZE:
            raise ConvertError(f"tensor {name!r} has dtype {e.dtype}; only F32, F16, BF16 and F64 are supported")
        count = int(np.prod(e.shape, dtype=np.int64))
        if count * self._ITEMSIZE[e.dtype] != e.end - e.begin:
            raise ConvertError(f"tensor {name!r} in {e.file.name}: byte size does not match shape {e.shape}")
        if count == 0:
            return np.zeros(e.shape, dtype=np.float32)
        with open(e.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            dt = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}[e.dtype]
            view = np.frombuffer(mm, dtype=dt, count=count, offset=e.begin)
            if e.dtype == "BF16":
                # bfloat16 is the upper half of a float32: widen the bits, then reinterpret.
                out = (view.astype(np.uint32) << 16).view(np.float32)
            else:
                out = view.astype(np.float32)  # always a copy, so the map can close
            del view  # the map cannot close while a view into it is alive
        return out.reshape(e.shape)


# ----------------------------------------------------------------------------- tensor types

OUTTYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0")


def _outtype(name: str):
    """--outtype -> (GGML type for 2-D weights, general.file_type).

    Built on demand so that a missing gguf package is a ConvertError, not an import crash.
    """
    if gguf is None:
        raise ConvertError("the 'gguf' Python package is required: pip install gguf")
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    table = {
        "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
        "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    }
    if name not in table:
        raise ConvertError(f"unknown outtype {name!r}; choose one of {', '.join(OUTTYPE_NAMES)}")
    return table[name]


def pick_type(shape: tuple[int, ...], wanted) -> tuple[Any, str | None]:
    """GGML type for a tensor of this (numpy-order) shape, plus a note when we deviate.

    1-D tensors (norms, biases, rope factors) stay F32: they are tiny and llama.cpp's
    kernels expect F32 there. Block-quantized types need rows that are a whole number
    of blocks; otherwise we fall back to F16 rather than fail.
    """
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32, None
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return Q.F16, f"row length {shape[-1]} is not a multiple of {block}: stored as F16 instead of {wanted.name}"
    return wanted, None


def encoded_layout(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, nbytes) of the array gguf.quants.quantize() returns for this tensor."""
    Q = gguf.GGMLQuantizationType
    n = int(np.prod(shape, dtype=np.int64))
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), 4 * n
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), 2 * n
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64))


# ----------------------------------------------------------------------------- tokenizer

# Pre-tokenizer regexes we recognise inside a Split pre-tokenizer, with the llama.cpp
# "tokenizer.ggml.pre" name that reproduces them.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

# Structural signatures of tokenizer.json pre_tokenizer -> llama.cpp pre-tokenizer name.
_KNOWN_PRE = {
    (("ByteLevel", True),): "gpt2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _QWEN2_REGEX, "Isolated", False), ("ByteLevel", False)): "qwen2",
    (("Split", _LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False)): "llama-bpe",
}


def _pre_parts(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _pre_signature(part: dict) -> tuple:
    kind = part.get("type")
    if kind == "ByteLevel":
        if part.get("add_prefix_space"):
            return ("ByteLevel", "add_prefix_space")  # never matches: llama.cpp has no such mode
        return ("ByteLevel", bool(part.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(part.get("individual_digits")))
    if kind == "Split":
        pattern = part.get("pattern") or {}
        return ("Split", pattern.get("Regex", pattern.get("String")), part.get("behavior"), bool(part.get("invert")))
    return (kind,)


def _describe_pre(pre: dict | None) -> str:
    """Readable form of a pre_tokenizer for error messages, e.g. Sequence[Digits(...), ByteLevel(...)]."""
    shown = {"ByteLevel": ("add_prefix_space", "use_regex"), "Digits": ("individual_digits",),
             "Split": ("pattern", "behavior", "invert")}

    def one(p: dict) -> str:
        args = ", ".join(f"{k}={p.get(k)!r}" for k in shown.get(p.get("type"), ()))
        return f"{p.get('type')}({args})"
    parts = _pre_parts(pre)
    return "Sequence[" + ", ".join(one(p) for p in parts) + "]" if len(parts) != 1 else one(parts[0])


def detect_pre_tokenizer(pre: dict | None) -> str:
    """Map tokenizer.json's pre_tokenizer structure to llama.cpp's tokenizer.ggml.pre name.

    llama.cpp identifies pre-tokenizers by hashing the token ids of a probe text; we look
    at the structure directly, which needs no reference tokenization.
    """
    sig = tuple(_pre_signature(p) for p in _pre_parts(pre))
    if sig not in _KNOWN_PRE:
        raise ConvertError(f"unsupported pre-tokenizer {_describe_pre(pre)}; supported: "
                           "ByteLevel (gpt2), Digits+ByteLevel (smollm), Qwen2 Split+ByteLevel (qwen2), "
                           "Llama-3 Split+ByteLevel (llama-bpe)")
    return _KNOWN_PRE[sig]


@dataclass
class Vocab:
    """Everything GGUF's tokenizer.* keys need, read from the HF tokenizer files."""
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool | None
    chat_template: str | list | None

    def write(self, w) -> None:
        w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        for add, tid in ((w.add_bos_token_id, self.bos_id), (w.add_eos_token_id, self.eos_id),
                         (w.add_pad_token_id, self.pad_id), (w.add_unk_token_id, self.unk_id)):
            if tid is not None:
                add(tid)
        w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)
            if "<|im_start|>" in _default_template(self.chat_template):
                # Tells x2l-edge's prompt builder which turn format the model expects.
                w.add_string("x2l.chat_format", "chatml")


def _default_template(template: str | list) -> str:
    if isinstance(template, str):
        return template
    for t in template:
        if t.get("name") == "default":
            return t.get("template") or ""
    return ""


def _load_chat_template(hf_dir: Path, tok_cfg: dict) -> str | list | None:
    """tokenizer_config.json first, then the newer standalone files (processors use chat_template.json)."""
    if tok_cfg.get("chat_template"):
        return tok_cfg["chat_template"]
    jinja = hf_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    as_json = hf_dir / "chat_template.json"
    if as_json.exists():
        return _read_json(as_json).get("chat_template")
    return None


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tok_cfg: dict, config: dict, key: str, token_to_id: dict[str, int]) -> int | None:
    """Id of bos/eos/pad: tokenizer_config's token string wins, config.json's *_token_id is the fallback."""
    text = _token_text(tok_cfg.get(f"{key}_token"))
    if text is not None and text in token_to_id:
        return token_to_id[text]
    tid = config.get(f"{key}_token_id")
    if isinstance(tid, list):  # e.g. Llama 3.1 lists several eos ids; the first is the primary
        tid = tid[0] if tid else None
    return tid if isinstance(tid, int) else None


def _adds_bos_in_post_processor(tok_json: dict, bos_text: str | None) -> bool:
    """Fallback for add_bos_token: does the TemplateProcessing post-processor prepend BOS?"""
    post = tok_json.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            if "SpecialToken" in first and first["SpecialToken"].get("id") == bos_text:
                return True
    return False


def _looks_special(text: str) -> bool:
    # Some tokenizers (e.g. Qwen's <|fim_prefix|>) mark control tokens as non-special;
    # llama.cpp's converter treats <|...|> added tokens as CONTROL regardless, and so do we.
    return text.startswith("<|") and text.endswith("|>")


def load_bpe_vocab(hf_dir: Path, config: dict, vocab_size: int) -> Vocab:
    """Read a byte-level BPE tokenizer.json (+ tokenizer_config.json) into a Vocab.

    Tokens are ordered by id and padded with "[PAD{i}]" (type UNUSED) up to the model's
    vocab_size, as llama.cpp does, because the embedding matrix may have more rows than
    the tokenizer has tokens.
    """
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.exists():
        if (hf_dir / "tokenizer.model").exists():
            raise ConvertError(f"{hf_dir} has a SentencePiece tokenizer.model and no tokenizer.json; "
                               "only byte-level BPE tokenizers (tokenizer.json) are supported")
        raise ConvertError(f"no tokenizer.json in {hf_dir}")
    tok = _read_json(tok_path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"tokenizer.json model type is {model.get('type')!r} (SentencePiece-style); "
                           "only byte-level BPE tokenizers are supported")
    if model.get("byte_fallback") or not any(p.get("type") == "ByteLevel" for p in _pre_parts(tok.get("pre_tokenizer"))):
        raise ConvertError("tokenizer.json is a SentencePiece-style BPE (byte_fallback / no ByteLevel "
                           f"pre-tokenizer: {_describe_pre(tok.get('pre_tokenizer'))}); only byte-level BPE is supported")
    normalizer = tok.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":  # Qwen2 uses NFC, which llama.cpp also ignores
        raise ConvertError(f"unsupported tokenizer normalizer {normalizer.get('type')!r}")
    pre = detect_pre_tokenizer(tok.get("pre_tokenizer"))

    token_to_id: dict[str, int] = dict(model.get("vocab") or {})
    id_to_token = {i: t for t, i in token_to_id.items()}
    added_kind: dict[int, bool] = {}  # id -> special?
    for at in tok.get("added_tokens") or []:
        tid, text = at["id"], at["content"]
        if id_to_token.get(tid, text) != text:
            raise ConvertError(f"token id {tid} is {id_to_token[tid]!r} in the BPE vocab but {text!r} in added_tokens")
        id_to_token[tid] = text
        token_to_id[text] = tid
        added_kind[tid] = bool(at.get("special"))

    if id_to_token and max(id_to_token) >= vocab_size:
        raise ConvertError(f"tokenizer has token id {max(id_to_token)} but the model's vocab_size is {vocab_size}")
    TT = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
        else:
            tokens.append(id_to_token[i])
            if i not in added_kind:
                types.append(int(TT.NORMAL))
            else:
                types.append(int(TT.CONTROL if added_kind[i] or _looks_special(id_to_token[i]) else TT.USER_DEFINED))

    # Older tokenizers store merges as "a b" strings, newer ones as ["a", "b"] pairs.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    bos_id = _special_id(tok_cfg, config, "bos", token_to_id)
    eos_id = _special_id(tok_cfg, config, "eos", token_to_id)
    pad_id = _special_id(tok_cfg, config, "pad", token_to_id)
    unk_id = _special_id(tok_cfg, {}, "unk", token_to_id)
    for key, tid in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise ConvertError(f"{key} token id {tid} is outside the vocabulary (size {vocab_size})")
    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _adds_bos_in_post_processor(tok, _token_text(tok_cfg.get("bos_token")))
    add_eos = tok_cfg.get("add_eos_token") if isinstance(tok_cfg.get("add_eos_token"), bool) else None

    return Vocab(pre=pre, tokens=tokens, types=types, merges=merges, bos_id=bos_id, eos_id=eos_id,
                 pad_id=pad_id, unk_id=unk_id, add_bos=add_bos, add_eos=add_eos,
                 chat_template=_load_chat_template(hf_dir, tok_cfg))


# ----------------------------------------------------------------------------- model handlers

@dataclass
class TensorSpec:
    """One GGUF tensor to write: its name, numpy-order shape, and how to produce its float32 data."""
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source: str  # HF tensor name (or a description) for messages


def permute_for_norm_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half RoPE layout to GGML's interleaved ("NORM") RoPE.

    HF pairs dimension j with j + head_dim/2 inside each head; GGML pairs 2j with 2j+1.
    Splitting each head's rows into (2, head_dim/2) and swapping the two axes moves
    row j + head_dim/2 next to row j. Works for weights (rows x cols) and biases (rows).
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None), from either config layout.

    transformers < 5 writes rope_theta + rope_scaling; transformers >= 5 writes one
    rope_parameters dict that holds rope_theta and the scaling fields together.
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ConvertError(f"per-layer-type rope_parameters ({', '.join(params)}) are not supported")
        theta, scaling = params.get("rope_theta", config.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), (None if kind == "default" else dict(scaling, rope_type=kind))


def llama3_rope_factors(scaling: dict, theta: float, rot_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama-3 RoPE scaling, in llama.cpp's rope_freqs layout."""
    factor = scaling.get("factor", 8.0)
    lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, blended))
    return out.astype(np.float32)


@dataclass
class TextHParams:
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "TextHParams":
        n_embd, n_head = _require(cfg, "hidden_size"), _require(cfg, "num_attention_heads")
        theta, scaling = rope_settings(cfg)
        return cls(
            n_vocab=_require(cfg, "vocab_size"),
            n_ctx=_require(cfg, "max_position_embeddings"),
            n_embd=n_embd,
            n_layer=_require(cfg, "num_hidden_layers"),
            n_ff=_require(cfg, "intermediate_size"),
            n_head=n_head,
            n_head_kv=cfg.get("num_key_value_heads") or n_head,  # HF's default: no GQA
            head_dim=cfg.get("head_dim") or n_embd // n_head,
            rms_eps=float(_require(cfg, "rms_norm_eps")),
            rope_theta=theta,
            rope_scaling=scaling,
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )


class ModelHandler:
    """Base class: one subclass per Hugging Face architecture (config.json "architectures")."""
    hf_arch = ""
    gguf_arch = ""

    def __init__(self, hf_dir: Path, config: dict):
        self.hf_dir, self.config = hf_dir, config

    def write_metadata(self, w) -> None:
        raise NotImplementedError

    def load_vocab(self) -> Vocab:
        raise NotImplementedError

    def tensor_plan(self, ckpt: SafetensorsCheckpoint) -> list[TensorSpec]:
        """Every GGUF tensor, in write order. Must raise ConvertError for missing or unused HF tensors."""
        raise NotImplementedError


class LlamaLikeText:
    """A llama-layout decoder (RMSNorm, GQA attention, SwiGLU MLP) under an HF name prefix.

    Used directly by the Llama and Qwen2 handlers with prefix "model."; multimodal
    handlers can reuse it with their language-model prefix.
    """

    def __init__(self, hp: TextHParams, *, permute_qk: bool, qkv_bias: bool, o_bias: bool,
                 prefix: str = "model.", lm_head: str = "lm_head.weight"):
        self.hp, self.permute_qk, self.qkv_bias, self.o_bias = hp, permute_qk, qkv_bias, o_bias
        self.prefix, self.lm_head = prefix, lm_head

    def write_metadata(self, w) -> None:
        hp = self.hp
        w.add_vocab_size(hp.n_vocab)
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim != hp.n_embd // hp.n_head:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(_require(hp.rope_scaling, "factor", "rope scaling")))
        # llama3 scaling is carried by the rope_freqs tensor (see tensor_plan), as in llama.cpp.

    def _expected(self) -> list[tuple[str, str, tuple[int, ...], Callable | None]]:
        """(gguf name, hf name, hf shape, transform) for every tensor the model needs."""
        hp, p = self.hp, self.prefix
        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        perm_q = perm_k = None
        if self.permute_qk:
            perm_q = lambda x: permute_for_norm_rope(x, hp.n_head)      # noqa: E731
            perm_k = lambda x: permute_for_norm_rope(x, hp.n_head_kv)   # noqa: E731
        out = [("token_embd.weight", f"{p}embed_tokens.weight", (hp.n_vocab, hp.n_embd), None)]
        for i in range(hp.n_layer):
            b, h = f"blk.{i}.", f"{p}layers.{i}."
            out += [
                (b + "attn_norm.weight", h + "input_layernorm.weight", (hp.n_embd,), None),
                (b + "attn_q.weight", h + "self_attn.q_proj.weight", (q_dim, hp.n_embd), perm_q),
                (b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv_dim, hp.n_embd), perm_k),
                (b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv_dim, hp.n_embd), None),
            ]
            if self.qkv_bias:
                out += [
                    (b + "attn_q.bias", h + "self_attn.q_proj.bias", (q_dim,), perm_q),
                    (b + "attn_k.bias", h + "self_attn.k_proj.bias", (kv_dim,), perm_k),
                    (b + "attn_v.bias", h + "self_attn.v_proj.bias", (kv_dim,), None),
                ]
            out.append((b + "attn_output.weight", h + "self_attn.o_proj.weight", (hp.n_embd, q_dim), None))
            if self.o_bias:
                out.append((b + "attn_output.bias", h + "self_attn.o_proj.bias", (hp.n_embd,), None))
            out += [
                (b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (hp.n_embd,), None),
                (b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (hp.n_ff, hp.n_embd), None),
                (b + "ffn_up.weight", h + "mlp.up_proj.weight", (hp.n_ff, hp.n_embd), None),
                (b + "ffn_down.weight", h + "mlp.down_proj.weight", (hp.n_embd, hp.n_ff), None),
            ]
        out.append(("output_norm.weight", f"{p}norm.weight", (hp.n_embd,), None))
        if not hp.tied:
            out.append(("output.weight", self.lm_head, (hp.n_vocab, hp.n_embd), None))
        return out

    def tensor_plan(self, ckpt: SafetensorsCheckpoint) -> tuple[list[TensorSpec], set[str]]:
        """Specs for the text model, and the HF names it consumed or deliberately skips."""
        specs, used = [], set()
        for gguf_name, hf_name, shape, transform in self._expected():
            if hf_name not in ckpt:
                raise ConvertError(f"checkpoint is missing tensor {hf_name!r} (needed for {gguf_name})")
            if tuple(ckpt.shape(hf_name)) != shape:
                raise ConvertError(f"tensor {hf_name!r} has shape {list(ckpt.shape(hf_name))}, "
                                   f"but config.json implies {list(shape)}")
            specs.append(TensorSpec(gguf_name, shape, _loader(ckpt, hf_name, transform), hf_name))
            used.add(hf_name)
        if self.hp.tied:
            used.add(self.lm_head)  # some tied checkpoints still store a copy; it is not needed
        used.update(n for n in ckpt.names() if n.startswith(self.prefix) and n.endswith("rotary_emb.inv_freq"))
        return specs, used


def _loader(ckpt: SafetensorsCheckpoint, name: str, transform: Callable | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        data = ckpt.load(name)
        return transform(data) if transform else data
    return load


class LlamaLikeHandler(ModelHandler):
    """Shared logic for plain llama-layout causal LMs; subclasses set the per-arch details."""
    permute_qk = False
    rope_types = ("linear",)  # beyond "default"

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        self.hp = TextHParams.from_config(config)
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConvertError(f"hidden_act {act!r} is not supported (llama.cpp's {self.gguf_arch} uses silu)")
        if self.hp.rope_scaling and self.hp.rope_scaling["rope_type"] not in self.rope_types:
            raise ConvertError(f"rope scaling type {self.hp.rope_scaling['rope_type']!r} is not supported for "
                               f"{self.hf_arch} (supported: default, {', '.join(self.rope_types)})")
        self.text = self._make_text()

    def _make_text(self) -> LlamaLikeText:
        raise NotImplementedError

    def write_metadata(self, w) -> None:
        self.text.write_metadata(w)

    def load_vocab(self) -> Vocab:
        return load_bpe_vocab(self.hf_dir, self.config, self.hp.n_vocab)

    def extra_tensors(self) -> list[TensorSpec]:
        return []

    def tensor_plan(self, ckpt: SafetensorsCheckpoint) -> list[TensorSpec]:
        specs, used = self.text.tensor_plan(ckpt)
        unused = [n for n in ckpt.names() if n not in used]
        if unused:
            # Refusing instead of dropping them keeps us from silently losing weights.
            shown = ", ".join(repr(n) for n in unused[:5]) + (" ..." if len(unused) > 5 else "")
            raise ConvertError(f"{len(unused)} checkpoint tensor(s) have no GGUF mapping for {self.hf_arch}: {shown}")
        return self.extra_tensors() + specs


class LlamaHandler(LlamaLikeHandler):
    hf_arch, gguf_arch = "LlamaForCausalLM", "llama"
    rope_types = ("linear", "llama3")

    def _make_text(self) -> LlamaLikeText:
        if self.config.get("mlp_bias"):
            raise ConvertError("LlamaForCausalLM with mlp_bias=true is not supported")
        bias = bool(self.config.get("attention_bias"))
        # GGUF "llama" uses interleaved RoPE, so q/k rows must be permuted (see permute_for_norm_rope).
        return LlamaLikeText(self.hp, permute_qk=True, qkv_bias=bias, o_bias=bias)

    def extra_tensors(self) -> list[TensorSpec]:
        sc = self.hp.rope_scaling
        if not sc or sc["rope_type"] != "llama3":
            return []
        factors = llama3_rope_factors(sc, self.hp.rope_theta, self.hp.head_dim)
        return [TensorSpec("rope_freqs.weight", factors.shape, lambda: factors, "llama3 rope_scaling")]


class Qwen2Handler(LlamaLikeHandler):
    hf_arch, gguf_arch = "Qwen2ForCausalLM", "qwen2"

    def _make_text(self) -> LlamaLikeText:
        if self.config.get("use_sliding_window"):
            raise ConvertError("Qwen2 with use_sliding_window=true is not supported")
        # GGUF "qwen2" uses NEOX (rotate-half) RoPE like HF: no permutation.
        return LlamaLikeText(self.hp, permute_qk=False, qkv_bias=True, o_bias=False)


HANDLERS: dict[str, type[ModelHandler]] = {h.hf_arch: h for h in (LlamaHandler, Qwen2Handler)}


def make_handler(hf_dir: Path, config: dict) -> ModelHandler:
    archs = config.get("architectures") or []
    if not archs:
        raise ConvertError("config.json has no 'architectures' entry, so the model type is unknown")
    for arch in archs:
        if arch in HANDLERS:
            return HANDLERS[arch](hf_dir, config)
    raise ConvertError(f"unsupported architecture {', '.join(archs)}; supported: {', '.join(HANDLERS)}")


# ----------------------------------------------------------------------------- conversion

def convert(hf_dir, out_path, outtype: str = "f16", progress: bool = True) -> Path:
    """Convert HF_DIR to one GGUF file at OUT_PATH; returns the output path.

    Everything that can be wrong with the input is checked before the output is opened,
    and the file is written under a temporary name and renamed at the end, so a failed
    run never leaves a half-written .gguf behind.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    wanted, file_type = _outtype(outtype)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir} is not a directory")
    config = _read_json(hf_dir / "config.json")
    handler = make_handler(hf_dir, config)
    vocab = handler.load_vocab()
    specs = handler.tensor_plan(SafetensorsCheckpoint(hf_dir))

    if not out_path.parent.is_dir():
        raise ConvertError(f"output directory {out_path.parent} does not exist")
    tmp = out_path.with_name(out_path.name + ".part")
    writer = gguf.GGUFWriter(tmp, handler.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.get("_name_or_path") or hf_dir.resolve().name)
    handler.write_metadata(writer)
    vocab.write(writer)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    types = []
    for spec in specs:
        qtype, note = pick_type(spec.shape, wanted)
        if note:
            _log(True, f"convert: {spec.name}: {note}")  # a deviation from --outtype is always worth seeing
        shape, dtype, nbytes = encoded_layout(spec.shape, qtype)
        writer.add_tensor_info(spec.name, shape, dtype, nbytes, raw_dtype=qtype)
        types.append(qtype)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        width = len(str(len(specs)))
        for k, (spec, qtype) in enumerate(zip(specs, types), 1):
            data = spec.load()
            if qtype == gguf.GGMLQuantizationType.F16 and np.abs(data).max(initial=0) > 65504:
                _log(True, f"convert: warning: {spec.name} has values beyond the F16 range (they become inf)")
            writer.write_tensor_data(gguf.quants.quantize(data, qtype))
            _log(progress, f"[{k:>{width}}/{len(specs)}] {spec.name:<28} {qtype.name:<5} "
                           f"{'x'.join(map(str, spec.shape))}  <- {spec.source}")
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    _log(progress, f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, {len(specs)} tensors)")
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert a Hugging Face checkpoint directory to one GGUF file.")
    ap.add_argument("hf_dir", help="directory with config.json, *.safetensors and tokenizer.json")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--outtype", default="f16", choices=OUTTYPE_NAMES,
                    help="type for 2-D weights (1-D tensors are always f32); default f16")
    ap.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")
    args = ap.parse_args(argv)
    try:
        convert(args.hf_dir, args.out, args.outtype, progress=not args.quiet)
    except ConvertError as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
