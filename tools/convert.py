#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint directory into one GGUF file.

    python tools/convert.py HF_DIR OUT.gguf --outtype {f32,f16,bf16,q8_0,q4_0,q4_1,q5_0} [--quiet]

or, from Python, ``convert(hf_dir, out_path, outtype="f16", progress=True)``.

HF_DIR holds config.json, *.safetensors (optionally sharded with
model.safetensors.index.json), tokenizer.json (or a slow Qwen2 tokenizer's vocab.json +
merges.txt) and tokenizer_config.json; for LLaVA-OneVision also the processor files
(chat_template.json, video_preprocessor_config.json), for Video-XL the CLIP tower's
config.json (see VideoXLHandler._tower_config).

The output follows llama.cpp's names, metadata keys and tensor layouts, so llama.cpp
itself can load it (the tests check this with llama-cpp-python). Tensors are streamed:
safetensors headers are parsed up front, then each tensor is read from a memory map,
converted and written before the next one is touched, so peak memory is about one
tensor, not the model.

One handler class per Hugging Face architecture (see ``HANDLERS``) turns config.json
into GGUF metadata and HF tensor names into GGUF tensors:

    LlamaForCausalLM, Qwen2ForCausalLM          text only (x2l.model_kind = text)
    LlavaOnevisionForConditionalGeneration      SigLIP + MLP projector + Qwen2/Llama, bilinear pooling
    LlavaQwenForCausalLM (Video-XL)             CLIP-L/14-336 + MLP projector + Qwen2 + beacon (VST) weights
    Qwen2VLForConditionalGeneration,            llama.cpp's model.gguf + mmproj.gguf in one file (what
    Qwen2_5_VLForConditionalGeneration,         tools/merge_mmproj.py makes of its converter's pair: the
    Idefics3ForConditionalGeneration,           same tensors and keys), plus the HF config values the
    SmolVLMForConditionalGeneration             pair leaves to defaults (x2l.vision.*, x2l.video.*)

Multimodal handlers reuse ``LlamaLikeText`` for the language model under their name
prefix and add the vision tower (v.*), projector (mm.*), VST tensors and the clip.* /
x2l.* keys described in docs/gguf_layout.md. Every file also gets the X²L defaults
(x2l.chunk_frames, ratio_low, ratio_high, pin_ends, top_k).

Type rules: 2-D weights follow --outtype (F16 where a row is not a whole number of quant
blocks), 1-D tensors and the vision position/class embeddings and the VST embedding stay
F32, and the 4-D patch-embedding kernel is F32 for --outtype f32, else F16.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import re
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


def spec_type(spec, wanted) -> tuple[Any, str | None]:
    """GGML type for a TensorSpec: its ``store`` rule, else pick_type()."""
    Q = gguf.GGMLQuantizationType
    if spec.store == "f32":
        return Q.F32, None
    if spec.store == "conv":
        return (Q.F32 if wanted == Q.F32 else Q.F16), None
    return pick_type(spec.shape, wanted)


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


def _load_chat_template(hf_dir: Path, tok_cfg: dict, prefer_processor: bool = False) -> str | list | None:
    """tokenizer_config.json first, then the newer standalone files (processors use chat_template.json).

    With prefer_processor (multimodal models) the standalone files win: a processor's template
    knows the <image>/<video> content parts, the tokenizer's copy is often the text-only one.
    """
    def standalone() -> str | list | None:
        jinja = hf_dir / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text(encoding="utf-8")
        as_json = hf_dir / "chat_template.json"
        if as_json.exists():
            return _read_json(as_json).get("chat_template")
        return None
    if prefer_processor:
        return standalone() or tok_cfg.get("chat_template") or None
    if tok_cfg.get("chat_template"):
        return tok_cfg["chat_template"]
    return standalone()


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


def _slow_qwen2_tokenizer_json(hf_dir: Path) -> dict:
    """Build the parts of a tokenizer.json we read from a slow Qwen2 tokenizer's files.

    vocab.json + merges.txt hold the BPE; the added tokens come from tokenizer_config.json's
    added_tokens_decoder (with their "special" flag) or else added_tokens.json. Only
    Qwen2Tokenizer is accepted, because its pre-tokenizer (the Qwen2 split regex) is fixed
    by the class and not written to any file.
    """
    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    cls = tok_cfg.get("tokenizer_class")
    if cls not in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise ConvertError(f"{hf_dir} has vocab.json + merges.txt but no tokenizer.json, and tokenizer_class is "
                           f"{cls!r}; without tokenizer.json only Qwen2Tokenizer is supported")
    vocab = _read_json(hf_dir / "vocab.json")
    merges = []
    with open(hf_dir / "merges.txt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line and not line.startswith("#version"):
                merges.append(line)
    added = []
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    if decoder:
        for tid, info in decoder.items():
            added.append({"id": int(tid), "content": info["content"], "special": bool(info.get("special"))})
    elif (hf_dir / "added_tokens.json").exists():
        for text, tid in _read_json(hf_dir / "added_tokens.json").items():
            added.append({"id": int(tid), "content": text, "special": _looks_special(text)})
    return {
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "added_tokens": sorted(added, key=lambda a: a["id"]),
    }


def load_bpe_vocab(hf_dir: Path, config: dict, vocab_size: int, *, prefer_processor_template: bool = False) -> Vocab:
    """Read a byte-level BPE tokenizer.json (+ tokenizer_config.json) into a Vocab.

    Tokens are ordered by id and padded with "[PAD{i}]" (type UNUSED) up to the model's
    vocab_size, as llama.cpp does, because the embedding matrix may have more rows than
    the tokenizer has tokens.
    """
    tok_path = hf_dir / "tokenizer.json"
    if tok_path.exists():
        tok = _read_json(tok_path)
    elif (hf_dir / "vocab.json").exists() and (hf_dir / "merges.txt").exists():
        tok = _slow_qwen2_tokenizer_json(hf_dir)  # e.g. Video-XL ships only the slow Qwen2 tokenizer files
    else:
        if (hf_dir / "tokenizer.model").exists():
            raise ConvertError(f"{hf_dir} has a SentencePiece tokenizer.model and no tokenizer.json; "
                               "only byte-level BPE tokenizers (tokenizer.json) are supported")
        raise ConvertError(f"no tokenizer.json in {hf_dir}")
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
                 chat_template=_load_chat_template(hf_dir, tok_cfg, prefer_processor_template))


# ----------------------------------------------------------------------------- model handlers

@dataclass
class TensorSpec:
    """One GGUF tensor to write: its name, numpy-order shape, and how to produce its float32 data."""
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source: str  # HF tensor name (or a description) for messages
    # How the GGML type is chosen: "auto" = --outtype for 2-D tensors (F16 where rows are not
    # whole blocks), F32 for 1-D; "f32" = always F32 (position/class embeddings, VST embedding);
    # "conv" = F32 when --outtype is f32, else F16 (the 4-D patch-embedding kernel).
    store: str = "auto"


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
    def from_config(cls, cfg: dict, where: str = "config.json") -> "TextHParams":
        n_embd, n_head = _require(cfg, "hidden_size", where), _require(cfg, "num_attention_heads", where)
        theta, scaling = rope_settings(cfg)
        return cls(
            n_vocab=_require(cfg, "vocab_size", where),
            n_ctx=_require(cfg, "max_position_embeddings", where),
            n_embd=n_embd,
            n_layer=_require(cfg, "num_hidden_layers", where),
            n_ff=_require(cfg, "intermediate_size", where),
            n_head=n_head,
            n_head_kv=cfg.get("num_key_value_heads") or n_head,  # HF's default: no GQA
            head_dim=cfg.get("head_dim") or n_embd // n_head,
            rms_eps=float(_require(cfg, "rms_norm_eps", where)),
            rope_theta=theta,
            rope_scaling=scaling,
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )


class ModelHandler:
    """Base class: one subclass per Hugging Face architecture (config.json "architectures")."""
    hf_arch = ""
    gguf_arch = ""
    model_kind = "text"  # x2l.model_kind
    is_video = False     # writes x2l.frames_default

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


# ----------------------------------------------------------------------------- shared text decoder

TEXT_ROPE_TYPES = {"llama": ("linear", "llama3"), "qwen2": ("linear",)}  # beyond "default"

# transformers' class defaults for keys that diff-serialized configs (e.g. a multimodal
# model's nested text_config) may leave out. Structural keys are still cross-checked
# against the tensor shapes.
TEXT_CONFIG_DEFAULTS = {
    "qwen2": {"vocab_size": 151936, "hidden_act": "silu", "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "num_key_value_heads": 32},
    "llama": {"vocab_size": 32000, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
}


def check_text_config(cfg: dict, hp: TextHParams, gguf_arch: str, owner: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"hidden_act {act!r} is not supported (llama.cpp's {gguf_arch} uses silu)")
    types = TEXT_ROPE_TYPES[gguf_arch]
    if hp.rope_scaling and hp.rope_scaling["rope_type"] not in types:
        raise ConvertError(f"rope scaling type {hp.rope_scaling['rope_type']!r} is not supported for "
                           f"{owner} (supported: default, {', '.join(types)})")


def make_text_decoder(gguf_arch: str, cfg: dict, hp: TextHParams, owner: str, *,
                      prefix: str = "model.", lm_head: str = "lm_head.weight") -> LlamaLikeText:
    """The llama.cpp-layout decoder for a llama or qwen2 config, under an HF name prefix."""
    if gguf_arch == "llama":
        if cfg.get("mlp_bias"):
            raise ConvertError(f"{owner} with mlp_bias=true is not supported")
        bias = bool(cfg.get("attention_bias"))
        # GGUF "llama" uses interleaved RoPE, so q/k rows must be permuted (see permute_for_norm_rope).
        return LlamaLikeText(hp, permute_qk=True, qkv_bias=bias, o_bias=bias, prefix=prefix, lm_head=lm_head)
    if gguf_arch == "qwen2":
        if cfg.get("use_sliding_window"):
            raise ConvertError("Qwen2 with use_sliding_window=true is not supported")
        # GGUF "qwen2" uses NEOX (rotate-half) RoPE like HF: no permutation.
        return LlamaLikeText(hp, permute_qk=False, qkv_bias=True, o_bias=False, prefix=prefix, lm_head=lm_head)
    raise ConvertError(f"{owner}: unsupported language model type {gguf_arch!r} (supported: llama, qwen2)")


def rope_freq_tensors(hp: TextHParams) -> list[TensorSpec]:
    """llama3 rope scaling travels as the rope_freqs tensor, as in llama.cpp."""
    sc = hp.rope_scaling
    if not sc or sc["rope_type"] != "llama3":
        return []
    factors = llama3_rope_factors(sc, hp.rope_theta, hp.head_dim)
    return [TensorSpec("rope_freqs.weight", factors.shape, lambda: factors, "llama3 rope_scaling")]


def _check_unused(ckpt, used: set[str], owner: str) -> None:
    unused = [n for n in ckpt.names() if n not in used]
    if unused:
        # Refusing instead of dropping them keeps us from silently losing weights.
        shown = ", ".join(repr(n) for n in unused[:5]) + (" ..." if len(unused) > 5 else "")
        raise ConvertError(f"{len(unused)} checkpoint tensor(s) have no GGUF mapping for {owner}: {shown}")


class LlamaLikeHandler(ModelHandler):
    """Shared logic for plain llama-layout causal LMs; subclasses set the per-arch details."""

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        self.hp = TextHParams.from_config(config)
        check_text_config(config, self.hp, self.gguf_arch, self.hf_arch)
        self.text = make_text_decoder(self.gguf_arch, config, self.hp, self.hf_arch)

    def write_metadata(self, w) -> None:
        self.text.write_metadata(w)

    def load_vocab(self) -> Vocab:
        return load_bpe_vocab(self.hf_dir, self.config, self.hp.n_vocab)

    def tensor_plan(self, ckpt: SafetensorsCheckpoint) -> list[TensorSpec]:
        specs, used = self.text.tensor_plan(ckpt)
        _check_unused(ckpt, used, self.hf_arch)
        return rope_freq_tensors(self.hp) + specs


class LlamaHandler(LlamaLikeHandler):
    hf_arch, gguf_arch = "LlamaForCausalLM", "llama"


class Qwen2Handler(LlamaLikeHandler):
    hf_arch, gguf_arch = "Qwen2ForCausalLM", "qwen2"


# ----------------------------------------------------------------------------- vision towers

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]

# HF hidden_act -> x2l.vision.act
_VISION_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}
# PIL resample codes (HF image processors store these) -> x2l.image.resample
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

SIGLIP_CONFIG_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
CLIP_CONFIG_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# Towers a Video-XL config may name by a path that does not exist here (mm_vision_tower is
# usually the trainer's local path). Only the head count cannot be read from the weights.
KNOWN_CLIP_TOWERS = {
    "clip-vit-large-patch14-336": dict(CLIP_CONFIG_DEFAULTS, hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
    "clip-vit-large-patch14": dict(CLIP_CONFIG_DEFAULTS, hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14),
}


class RenamedCheckpoint:
    """A checkpoint seen under canonical tensor names (``rename(original) -> canonical``).

    Lets one handler accept several naming schemes of the same model (e.g. the hub's
    transformers-4 names and what transformers 5 writes) without caring which it got.
    """

    def __init__(self, ckpt: SafetensorsCheckpoint, rename: Callable[[str], str]):
        self.ckpt, self.orig = ckpt, {}
        for name in ckpt.names():
            canon = rename(name)
            if canon in self.orig:
                raise ConvertError(f"checkpoint tensors {self.orig[canon]!r} and {name!r} are both {canon!r} "
                                   "(two naming schemes mixed in one checkpoint)")
            self.orig[canon] = name

    def names(self) -> list[str]:
        return list(self.orig)

    def __contains__(self, name: str) -> bool:
        return name in self.orig

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(self.orig[name])

    def load(self, name: str) -> np.ndarray:
        return self.ckpt.load(self.orig[name])


def _take(ckpt, specs: list[TensorSpec], used: set[str], gguf_name: str, hf_name: str,
          shape: tuple[int, ...], store: str = "auto", what: str = "tensor") -> None:
    """Plan one HF tensor -> GGUF tensor, checking that it exists with the expected shape."""
    if hf_name not in ckpt:
        raise ConvertError(f"checkpoint is missing {what} {hf_name!r} (needed for {gguf_name})")
    if tuple(ckpt.shape(hf_name)) != tuple(shape):
        raise ConvertError(f"{what} {hf_name!r} has shape {list(ckpt.shape(hf_name))}, expected {list(shape)}")
    specs.append(TensorSpec(gguf_name, tuple(shape), _loader(ckpt, hf_name, None), hf_name, store))
    used.add(hf_name)


def _layer_indices(ckpt, prefix: str) -> set[int]:
    out = set()
    for n in ckpt.names():
        if n.startswith(prefix):
            head = n[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return out


def _close(a, b) -> bool:
    return a is not None and len(a) == len(b) and np.allclose(np.asarray(a, np.float64), b, atol=1e-6)


@dataclass
class VisionTower:
    """A ViT tower (SigLIP or CLIP) as the runtime needs it, plus where its tensors are."""
    kind: str            # "siglip" | "clip"
    prefix: str          # HF name prefix of the tower, up to and including the dot before "embeddings"
    image_size: int
    patch_size: int
    width: int
    n_ff: int
    n_head: int
    eps: float
    act: str             # x2l.vision.act
    n_layer_hf: int      # layers in the checkpoint
    select_hf: int       # HF hidden_states index, as configured
    drop_cls: bool
    mean: list[float]
    std: list[float]
    resize: str          # x2l.image.resize
    resample: str        # x2l.image.resample

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_pos(self) -> int:
        return self.grid ** 2 + (1 if self.kind == "clip" else 0)

    def stored_layers(self) -> tuple[int, int]:
        """(layers to store, select_layer relative to them); layers past the selected one are dropped.

        hidden_states[0] is the embedding output (after CLIP's pre-LN) and hidden_states[i] the
        output of layer i-1, so select index s (s < 0 counts from the end of n+1 states) needs
        exactly s layers; -1 then means "output of the last stored layer".
        """
        n, s = self.n_layer_hf, self.select_hf
        if not -(n + 1) <= s <= n:
            raise ConvertError(f"vision select layer {s} is out of range for a {n}-layer tower "
                               f"(hidden_states has {n + 1} entries)")
        keep = s if s >= 0 else n + 1 + s
        if keep == 0:  # the embeddings themselves: store one layer (a tower needs >= 1) and never run it
            return min(1, n), 0
        return keep, -1


def vision_shapes(ckpt, prefix: str, kind: str, declared: dict, where: str) -> dict:
    """Tower dimensions read from the tensors, cross-checked with the config values in ``declared``."""
    emb = prefix + "embeddings."
    for n in (emb + "patch_embedding.weight", emb + "position_embedding.weight",
              prefix + "encoder.layers.0.mlp.fc1.weight"):
        if n not in ckpt:
            raise ConvertError(f"checkpoint is missing vision tensor {n!r}")
    width, chans, ph, pw = ckpt.shape(emb + "patch_embedding.weight")
    if chans != 3 or ph != pw:
        raise ConvertError(f"vision tensor {emb}patch_embedding.weight has shape {[width, chans, ph, pw]}; "
                           "expected [width, 3, patch, patch]")
    n_pos = ckpt.shape(emb + "position_embedding.weight")[0]
    n_patch = n_pos - (1 if kind == "clip" else 0)
    grid = int(round(n_patch ** 0.5))
    if grid * grid != n_patch:
        raise ConvertError(f"vision position embedding has {n_pos} rows, which is not a square patch grid"
                           + (" plus CLS" if kind == "clip" else ""))
    layers = _layer_indices(ckpt, prefix + "encoder.layers.")
    if layers != set(range(len(layers))):
        raise ConvertError(f"vision encoder layers under {prefix}encoder.layers. are not numbered 0..N-1: "
                           f"{sorted(layers)}")
    got = {"hidden_size": width, "patch_size": ph, "image_size": grid * ph, "num_hidden_layers": len(layers),
           "intermediate_size": ckpt.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0]}
    # A conv with stride = patch floors the grid: 384 px at patch 14 gives 27x27 (378 px used), as in
    # the real LLaVA-OneVision SigLIP. Keep the declared size when it floors to the same grid.
    decl_size = declared.get("image_size")
    if decl_size is not None and decl_size != got["image_size"] and decl_size // ph == grid:
        got["image_size"] = decl_size
    for key, value in got.items():
        if declared.get(key) is not None and declared[key] != value:
            raise ConvertError(f"{where} has {key}={declared[key]}, but the checkpoint's vision tensors give {value}")
    return got


def vision_tensor_plan(ckpt, vt: VisionTower) -> tuple[list[TensorSpec], set[str]]:
    """v.* tensors (llama.cpp clip names) for the layers the selected feature needs."""
    p, emb, W, F = vt.prefix, vt.prefix + "embeddings.", vt.width, vt.n_ff
    specs, used = [], set()

    def take(g, h, shape, store="auto"):
        _take(ckpt, specs, used, g, h, shape, store, "vision tensor")

    take("v.patch_embd.weight", emb + "patch_embedding.weight", (W, 3, vt.patch_size, vt.patch_size), "conv")
    if vt.kind == "siglip":
        take("v.patch_embd.bias", emb + "patch_embedding.bias", (W,))
    else:
        take("v.class_embd", emb + "class_embedding", (W,), "f32")
    take("v.position_embd.weight", emb + "position_embedding.weight", (vt.n_pos, W), "f32")
    if vt.kind == "clip":
        take("v.pre_ln.weight", p + "pre_layrnorm.weight", (W,))
        take("v.pre_ln.bias", p + "pre_layrnorm.bias", (W,))
    n_keep, _ = vt.stored_layers()
    for i in range(vt.n_layer_hf):
        h, b = f"{p}encoder.layers.{i}.", f"v.blk.{i}."
        if i >= n_keep:  # past the selected hidden state: never run, deliberately not stored
            used.update(n for n in ckpt.names() if n.startswith(h))
            continue
        for g, hf, (rows, cols) in (("ln1", "layer_norm1", (W, 0)), ("attn_q", "self_attn.q_proj", (W, W)),
                                    ("attn_k", "self_attn.k_proj", (W, W)), ("attn_v", "self_attn.v_proj", (W, W)),
                                    ("attn_out", "self_attn.out_proj", (W, W)), ("ln2", "layer_norm2", (W, 0)),
                                    ("ffn_up", "mlp.fc1", (F, W)), ("ffn_down", "mlp.fc2", (W, F))):
            take(f"{b}{g}.weight", f"{h}{hf}.weight", (rows, cols) if cols else (rows,))
            take(f"{b}{g}.bias", f"{h}{hf}.bias", (rows,))
    if p + "post_layernorm.weight" in ckpt:  # kept for completeness; features are taken before it
        take("v.post_ln.weight", p + "post_layernorm.weight", (W,))
        take("v.post_ln.bias", p + "post_layernorm.bias", (W,))
    if vt.kind == "siglip":  # SigLIP's attention-pooling head: unused by LLaVA models
        used.update(n for n in ckpt.names() if n.startswith(p + "head."))
    if emb + "position_ids" in ckpt:  # a buffer (arange) that transformers < 4.31 saved
        used.add(emb + "position_ids")
    return specs, used


def projector_plan(ckpt, names: tuple[str, str], n_embd: int, width: int) -> tuple[list[TensorSpec], set[str]]:
    """mm.0 / mm.2 (Linear, GELU, Linear) from the two HF linear layers' name prefixes."""
    specs, used = [], set()
    for g, h, shape in (("mm.0", names[0], (n_embd, width)), ("mm.2", names[1], (n_embd, n_embd))):
        _take(ckpt, specs, used, f"{g}.weight", f"{h}.weight", shape, what="projector tensor")
        _take(ckpt, specs, used, f"{g}.bias", f"{h}.bias", shape[:1], what="projector tensor")
    return specs, used


def _preprocessor_size(pre: dict) -> int | None:
    """The square side an HF image/video processor config resizes or crops to, if it says."""
    for key in ("crop_size", "size"):
        v = pre.get(key)
        if isinstance(v, int):
            return v
        if isinstance(v, dict):
            if v.get("height") is not None and v.get("height") == v.get("width"):
                return v["height"]
            if key == "size" and v.get("shortest_edge") is not None:
                return v["shortest_edge"]
    return None


def _preprocessor_resample(pre: dict | None, source: str) -> str:
    if not pre or pre.get("resample") is None:
        return "bicubic"
    value = pre["resample"]
    name = _RESAMPLE.get(value, value if isinstance(value, str) else None)
    if name not in ("bicubic", "bilinear"):
        raise ConvertError(f"{source}: resample={value!r} is not supported (bicubic or bilinear)")
    if name != "bicubic":
        _log(True, f"convert: warning: {source} resamples with {name}, not bicubic")
    return name


def _check_rescale(pre: dict | None, source: str) -> None:
    if not pre:
        return
    if pre.get("do_rescale") is False or pre.get("do_normalize") is False:
        raise ConvertError(f"{source}: do_rescale/do_normalize = false is not supported")
    factor = pre.get("rescale_factor")
    if factor is not None and abs(factor - 1 / 255) > 1e-9:
        raise ConvertError(f"{source}: rescale_factor {factor} is not supported (1/255)")


# ----------------------------------------------------------------------------- X²L defaults

# Written into every file (x2l.*); the runtime uses them when the caller gives no value. ratio_low: Video-XL's
# beacon tokens are trained for 2; the training-free compressors keep the L tier whole (1), because at 2 they
# drop the entries a question needs (docs/x2l.md, bench/results/compressors_smollm2.md).
X2L_DEFAULTS = {"chunk_frames": 10, "ratio_low": 1, "ratio_high": 32, "pin_ends": False, "top_k": 3}
BEACON_RATIO_LOW = 2
FRAMES_DEFAULT = 32  # x2l.frames_default, video models only


def write_x2l_defaults(w, model_kind: str, video: bool) -> None:
    w.add_string("x2l.model_kind", model_kind)
    defaults = dict(X2L_DEFAULTS, ratio_low=BEACON_RATIO_LOW if model_kind == "videoxl" else X2L_DEFAULTS["ratio_low"])
    for key, value in defaults.items():
        if isinstance(value, bool):
            w.add_bool(f"x2l.{key}", value)
        else:
            w.add_uint32(f"x2l.{key}", value)
    if video:
        w.add_uint32("x2l.frames_default", FRAMES_DEFAULT)


# ----------------------------------------------------------------------------- multimodal handlers

class MultimodalHandler(ModelHandler):
    """LLM (LlamaLikeText under a prefix) + ViT tower + 2-layer MLP projector (+ model extras).

    Subclasses fill in, in __init__: hp, text, gguf_arch, pool_mode, pool_stride, newline,
    image_token_id, video_token_id, proj_names; and in prepare(ckpt): self.vision (a
    VisionTower; some dimensions only come from the tensor shapes).
    tensor_plan() runs before write_metadata() in convert().
    """
    model_kind = ""
    is_video = True
    hp: TextHParams
    text: LlamaLikeText
    vision: VisionTower | None = None
    pool_mode = "none"
    pool_stride = 2
    newline = "none"
    image_token_id = -1
    video_token_id = -1
    proj_names: tuple[str, str] = ("", "")

    def view(self, ckpt: SafetensorsCheckpoint):
        return ckpt

    def prepare(self, ckpt) -> None:
        raise NotImplementedError

    def extra_plan(self, ckpt) -> tuple[list[TensorSpec], set[str]]:
        return [], set()

    def tokens_per_frame(self) -> int:
        g = self.vision.grid
        if self.pool_mode == "bilinear":
            g = -(-g // self.pool_stride)  # F.interpolate to ceil(g / stride)
        elif self.pool_mode == "avg":
            g = g // self.pool_stride      # avg_pool2d floors
        return g * g

    def tensor_plan(self, ckpt: SafetensorsCheckpoint) -> list[TensorSpec]:
        ckpt = self.view(ckpt)
        self.prepare(ckpt)
        specs, used = self.text.tensor_plan(ckpt)
        specs = rope_freq_tensors(self.hp) + specs
        for more, more_used in (self.extra_plan(ckpt), vision_tensor_plan(ckpt, self.vision),
                                projector_plan(ckpt, self.proj_names, self.hp.n_embd, self.vision.width)):
            specs += more
            used |= more_used
        _check_unused(ckpt, used, self.hf_arch)
        return specs

    def write_metadata(self, w) -> None:
        assert self.vision is not None, "tensor_plan() must run before write_metadata()"
        self.text.write_metadata(w)
        vt = self.vision
        n_keep, select = vt.stored_layers()
        w.add_bool("clip.has_vision_encoder", True)
        w.add_string("clip.projector_type", "mlp")
        w.add_uint32("clip.vision.image_size", vt.image_size)
        w.add_uint32("clip.vision.patch_size", vt.patch_size)
        w.add_uint32("clip.vision.embedding_length", vt.width)
        w.add_uint32("clip.vision.feed_forward_length", vt.n_ff)
        w.add_uint32("clip.vision.block_count", n_keep)
        w.add_uint32("clip.vision.projection_dim", self.hp.n_embd)
        w.add_uint32("clip.vision.attention.head_count", vt.n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", vt.eps)
        w.add_array("clip.vision.image_mean", [float(x) for x in vt.mean])
        w.add_array("clip.vision.image_std", [float(x) for x in vt.std])
        w.add_string("x2l.vision.kind", vt.kind)
        w.add_string("x2l.vision.act", vt.act)
        w.add_int32("x2l.vision.select_layer", select)
        w.add_bool("x2l.vision.drop_cls", vt.drop_cls)
        w.add_string("x2l.image.resize", vt.resize)
        w.add_string("x2l.image.resample", vt.resample)
        w.add_string("x2l.pool.mode", self.pool_mode)
        w.add_uint32("x2l.pool.stride", self.pool_stride)
        w.add_bool("x2l.pool.after_projector", True)
        w.add_string("x2l.video.newline", self.newline)
        w.add_uint32("x2l.tokens_per_frame", self.tokens_per_frame())
        w.add_int32("x2l.image_token_id", self.image_token_id)
        w.add_int32("x2l.video_token_id", self.video_token_id)


def _llava_ov_canonical(name: str) -> str:
    """Any LLaVA-OneVision tensor name -> the form transformers 5 saves.

    Hub (transformers 4) files: language_model.model.*, language_model.lm_head.weight,
    vision_tower.vision_model.*, multi_modal_projector.*, image_newline. transformers 5
    saves the same but vision_tower.* without "vision_model."; in memory (and in files
    written from a raw state_dict) it uses model.language_model.*, model.vision_tower.*,
    model.multi_modal_projector.*, model.image_newline and lm_head.weight.
    """
    for old, new in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline"), ("lm_head.", "language_model.lm_head.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    return name


# LlavaOnevisionConfig's class defaults, for keys a diff-serialized config.json leaves out.
LLAVA_OV_DEFAULTS = {"image_token_index": 151646, "video_token_index": 151647, "projector_hidden_act": "gelu",
                     "vision_feature_select_strategy": "full", "vision_feature_layer": -1,
                     "multimodal_projector_bias": True}


class LlavaOnevisionHandler(MultimodalHandler):
    """LLaVA-OneVision (transformers LlavaOnevisionForConditionalGeneration), video path.

    SigLIP -> hidden_states[vision_feature_layer] (before post-LN) -> all tokens ("full")
    -> Linear, GELU, Linear -> bilinear resize of the g x g grid to ceil(g/2) -> frames
    concatenated, one image_newline after the whole video.
    """
    hf_arch, model_kind = "LlavaOnevisionForConditionalGeneration", "llava_onevision"
    pool_mode, pool_stride, newline = "bilinear", 2, "end"
    proj_names = ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2")

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        top = {**LLAVA_OV_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        tc = config.get("text_config")
        if not isinstance(tc, dict):
            raise ConvertError("config.json is missing required key 'text_config'")
        arch = tc.get("model_type")
        if arch not in TEXT_CONFIG_DEFAULTS:
            raise ConvertError(f"config.json text_config.model_type is {arch!r}; supported: "
                               f"{', '.join(TEXT_CONFIG_DEFAULTS)}")
        self.text_cfg = {**TEXT_CONFIG_DEFAULTS[arch], **{k: v for k, v in tc.items() if v is not None}}
        self.gguf_arch = arch
        self.hp = TextHParams.from_config(self.text_cfg, "config.json text_config")
        check_text_config(self.text_cfg, self.hp, arch, self.hf_arch)
        self.text = make_text_decoder(arch, self.text_cfg, self.hp, self.hf_arch,
                                      prefix="language_model.model.", lm_head="language_model.lm_head.weight")
        self.tie_declared = bool(self.text_cfg.get("tie_word_embeddings") or config.get("tie_word_embeddings"))

        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ConvertError("config.json is missing required key 'vision_config'")
        if vc.get("model_type") != "siglip_vision_model":
            raise ConvertError(f"config.json vision_config.model_type is {vc.get('model_type')!r}; "
                               "only siglip_vision_model is supported for LLaVA-OneVision")
        self.vision_cfg = {**SIGLIP_CONFIG_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}
        if top["vision_feature_select_strategy"] != "full":
            raise ConvertError(f"vision_feature_select_strategy {top['vision_feature_select_strategy']!r} is not "
                               "supported for a SigLIP tower (it has no CLS token): expected 'full'")
        layer = top["vision_feature_layer"]
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ConvertError(f"vision_feature_layer {layer!r} is not supported (one integer layer index)")
        self.select = layer
        if top["projector_hidden_act"] != "gelu":
            raise ConvertError(f"projector_hidden_act {top['projector_hidden_act']!r} is not supported (gelu)")
        if not top["multimodal_projector_bias"]:
            raise ConvertError("multimodal_projector_bias=false is not supported")
        act = self.vision_cfg["hidden_act"]
        if act not in _VISION_ACTS:
            raise ConvertError(f"vision_config.hidden_act {act!r} is not supported ({', '.join(_VISION_ACTS)})")
        self.act = _VISION_ACTS[act]
        self.image_token_id = int(top.get("image_token_id", top["image_token_index"]))
        self.video_token_id = int(top.get("video_token_id", top["video_token_index"]))
        for key, tid in (("image_token_index", self.image_token_id), ("video_token_index", self.video_token_id)):
            if not 0 <= tid < self.hp.n_vocab:
                raise ConvertError(f"config.json {key} {tid} is outside the vocabulary (size {self.hp.n_vocab})")

    def view(self, ckpt):
        return RenamedCheckpoint(ckpt, _llava_ov_canonical)

    def _preprocessing(self, image_size: int) -> tuple[list[float], list[float], str]:
        pre, source = None, None
        for rel in ("video_preprocessor_config.json", "video_processor/preprocessor_config.json",
                    "processor_config.json", "preprocessor_config.json"):
            path = self.hf_dir / rel
            if not path.exists():
                continue
            data = _read_json(path)
            if rel == "processor_config.json":  # transformers 5 may nest the sub-processors
                data = data.get("video_processor") or data.get("image_processor")
                if not isinstance(data, dict):
                    continue
            pre, source = data, rel
            break
        if pre is None:
            return SIGLIP_MEAN, SIGLIP_STD, "bicubic"
        _check_rescale(pre, source)
        size = _preprocessor_size(pre)
        if size is not None and size != image_size:
            _log(True, f"convert: warning: {source} resizes to {size}, but the SigLIP tower's input is "
                       f"{image_size}x{image_size}; the runtime resizes to {image_size}")
        for key, want in (("image_mean", SIGLIP_MEAN), ("image_std", SIGLIP_STD)):
            if pre.get(key) is not None and not _close(pre[key], want):
                # transformers 5's video processor class defaults are CLIP's; SigLIP was trained with 0.5.
                _log(True, f"convert: warning: {source} has {key}={pre[key]}, but LLaVA-OneVision's SigLIP "
                           f"tower uses {want}; writing {want}")
        return SIGLIP_MEAN, SIGLIP_STD, _preprocessor_resample(pre, source)

    def prepare(self, ckpt) -> None:
        vc = self.vision_cfg
        dims = vision_shapes(ckpt, "vision_tower.", "siglip", vc, "config.json vision_config")
        mean, std, resample = self._preprocessing(dims["image_size"])
        self.vision = VisionTower(
            kind="siglip", prefix="vision_tower.", image_size=dims["image_size"], patch_size=dims["patch_size"],
            width=dims["hidden_size"], n_ff=dims["intermediate_size"], n_head=int(vc["num_attention_heads"]),
            eps=float(vc["layer_norm_eps"]), act=self.act, n_layer_hf=dims["num_hidden_layers"],
            select_hf=self.select, drop_cls=False, mean=mean, std=std, resize="square", resample=resample)
        if dims["hidden_size"] % self.vision.n_head:
            raise ConvertError(f"vision hidden_size {dims['hidden_size']} is not a multiple of "
                               f"num_attention_heads {self.vision.n_head}")
        has_head = self.text.lm_head in ckpt
        if not has_head and not self.tie_declared:
            raise ConvertError(f"checkpoint is missing tensor {self.text.lm_head!r} (needed for output.weight; "
                               "config.json does not declare tied embeddings)")
        self.hp.tied = not has_head

    def extra_plan(self, ckpt):
        specs, used = [], set()
        _take(ckpt, specs, used, "mm.image_newline", "image_newline", (self.hp.n_embd,), what="tensor")
        return specs, used

    def load_vocab(self) -> Vocab:
        cfg = dict(self.text_cfg)
        cfg.update({k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if self.config.get(k) is not None})
        vocab = load_bpe_vocab(self.hf_dir, cfg, self.hp.n_vocab, prefer_processor_template=True)
        for tid, text in ((self.image_token_id, "<image>"), (self.video_token_id, "<video>")):
            if vocab.tokens[tid] != text:
                _log(True, f"convert: warning: token {tid} is {vocab.tokens[tid]!r}, expected {text!r}")
        return vocab


# conv_qwen ("qwen_1_5"): ChatML with the default system prompt; used when the checkpoint has no template.
QWEN_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BEACON_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.beacon_(\w+?)_proj\.(weight|bias)$")


class VideoXLHandler(MultimodalHandler):
    """Video-XL (LlavaQwenForCausalLM, model_type llava_qwen): Qwen2 + CLIP-L/14-336 + beacon (VST) weights.

    CLIP -> hidden_states[mm_vision_select_layer] -> drop CLS -> Linear, GELU, Linear ->
    2x2 average pool -> frames concatenated, no newline. VST rows use their own q/k/v.
    """
    hf_arch, model_kind, gguf_arch = "LlavaQwenForCausalLM", "videoxl", "qwen2"
    proj_names = ("model.mm_projector.0", "model.mm_projector.2")
    prefix_vision = "model.vision_tower.vision_tower.vision_model."

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        cfg = dict(config)
        # LlavaQwenForCausalLM.__init__ forces rope_scaling = None: plain RoPE whatever the config says.
        cfg.pop("rope_scaling", None)
        if isinstance(cfg.get("rope_parameters"), dict):
            theta = cfg["rope_parameters"].get("rope_theta", cfg.get("rope_theta", 10000.0))
            cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        self.text_cfg = cfg
        self.hp = TextHParams.from_config(cfg)
        check_text_config(cfg, self.hp, "qwen2", self.hf_arch)
        self.text = make_text_decoder("qwen2", cfg, self.hp, self.hf_arch)

        if config.get("mm_vision_select_layer") is None:
            raise ConvertError("config.json is missing required key 'mm_vision_select_layer' (Video-XL's vision "
                               "feature layer; -1 and -2 are both plausible, so it is not guessed)")
        self.select = config["mm_vision_select_layer"]
        if not isinstance(self.select, int) or isinstance(self.select, bool):
            raise ConvertError(f"mm_vision_select_layer {self.select!r} is not an integer")
        feature = config.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            raise ConvertError(f"mm_vision_select_feature {feature!r} is not supported (patch)")
        proj = config.get("mm_projector_type", "linear")
        if proj != "mlp2x_gelu":
            raise ConvertError(f"mm_projector_type {proj!r} is not supported (mlp2x_gelu)")
        mode = config.get("mm_spatial_pool_mode", "average")
        modes = {"average": "avg", "bilinear": "bilinear"}
        if mode not in modes:
            raise ConvertError(f"mm_spatial_pool_mode {mode!r} is not supported ({', '.join(modes)})")
        self.pool_mode = modes[mode]
        stride = config.get("mm_spatial_pool_stride")
        if stride is None:
            _log(True, "convert: note: config.json has no mm_spatial_pool_stride; using 2 (as Video-XL's eval does)")
            stride = 2
        if not isinstance(stride, int) or stride < 1:
            raise ConvertError(f"mm_spatial_pool_stride {stride!r} is not a positive integer")
        self.pool_stride = stride

        self.vst_window = int(_require(config, "beacon_window"))
        beacon_stride = config.get("beacon_stride", self.vst_window)
        if beacon_stride != self.vst_window:
            raise ConvertError(f"beacon_stride {beacon_stride} != beacon_window {self.vst_window} is not supported")
        accum = _require(config, "beacon_accum")
        if not isinstance(accum, bool):
            raise ConvertError(f"beacon_accum {accum!r} is not a bool")
        self.vst_accum = accum
        ratios = config.get("beacon_ratio")
        if ratios is not None and (not isinstance(ratios, list) or not all(isinstance(r, int) for r in ratios)):
            raise ConvertError(f"beacon_ratio {ratios!r} is not a list of integers")
        self.vst_ratios = ratios
        self.vst_param: list[str] = []
        self.tower_cfg, self.tower_pre, self.tower_source = self._tower_config()

    def _tower_config(self) -> tuple[dict, dict | None, str]:
        """CLIP hyper-parameters the weights do not show (heads, eps, act) and its preprocessor config.

        mm_vision_tower is the training machine's path or a hub id: use it if it is a directory
        here (absolute, relative to HF_DIR, or its last component inside HF_DIR), else a known
        tower by name.
        """
        tower = _require(self.config, "mm_vision_tower")
        name = str(tower).rstrip("/").split("/")[-1]
        tried = []
        for d in (Path(tower), self.hf_dir / tower, self.hf_dir / name):
            if d in tried:
                continue
            tried.append(d)
            if (d / "config.json").is_file():
                raw = _read_json(d / "config.json")
                vc = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else raw
                vc = {**CLIP_CONFIG_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}
                pre = _read_json(d / "preprocessor_config.json") if (d / "preprocessor_config.json").is_file() else None
                return vc, pre, str(d / "config.json")
        if name in KNOWN_CLIP_TOWERS:
            return dict(KNOWN_CLIP_TOWERS[name]), None, f"known tower {name}"
        raise ConvertError(f"cannot find the vision tower's config: mm_vision_tower={tower!r} is not a directory "
                           f"with config.json here (tried {', '.join(str(t) for t in tried)}) and not a known tower "
                           f"({', '.join(KNOWN_CLIP_TOWERS)}); copy the tower's config.json (and "
                           f"preprocessor_config.json) to {self.hf_dir / name}/")

    def prepare(self, ckpt) -> None:
        vc, where = self.tower_cfg, self.tower_source
        dims = vision_shapes(ckpt, self.prefix_vision, "clip", vc, where)
        if self.config.get("mm_hidden_size") not in (None, dims["hidden_size"]):
            raise ConvertError(f"config.json mm_hidden_size {self.config['mm_hidden_size']} != the CLIP width "
                               f"{dims['hidden_size']} of the checkpoint")
        act = vc["hidden_act"]
        if act not in _VISION_ACTS:
            raise ConvertError(f"{where}: hidden_act {act!r} is not supported ({', '.join(_VISION_ACTS)})")
        pre, src = self.tower_pre, f"{Path(where).parent}/preprocessor_config.json"
        mean, std = CLIP_MEAN, CLIP_STD
        if pre:
            _check_rescale(pre, src)
            if pre.get("do_center_crop") is False:
                raise ConvertError(f"{src}: do_center_crop=false is not supported (CLIP: shortest side + center crop)")
            crop = _preprocessor_size(pre)
            if crop is not None and crop != dims["image_size"]:
                raise ConvertError(f"{src} crops to {crop}, but the CLIP tower's input is {dims['image_size']}")
            mean, std = pre.get("image_mean") or CLIP_MEAN, pre.get("image_std") or CLIP_STD
        self.vision = VisionTower(
            kind="clip", prefix=self.prefix_vision, image_size=dims["image_size"], patch_size=dims["patch_size"],
            width=dims["hidden_size"], n_ff=dims["intermediate_size"], n_head=int(vc["num_attention_heads"]),
            eps=float(vc["layer_norm_eps"]), act=_VISION_ACTS[act], n_layer_hf=dims["num_hidden_layers"],
            select_hf=self.select, drop_cls=True, mean=[float(x) for x in mean], std=[float(x) for x in std],
            resize="shortest_center_crop", resample=_preprocessor_resample(pre, src))
        if dims["hidden_size"] % self.vision.n_head:
            raise ConvertError(f"{where}: hidden_size {dims['hidden_size']} is not a multiple of "
                               f"num_attention_heads {self.vision.n_head}")
        if self.vision.grid // self.pool_stride < 1:
            raise ConvertError(f"mm_spatial_pool_stride {self.pool_stride} is larger than the patch grid")

    def extra_plan(self, ckpt):
        """Beacon (VST) weights: found by name, cross-checked against config beacon_param."""
        hp = self.hp
        found: set[str] = set()
        for n in ckpt.names():
            m = _BEACON_RE.match(n)
            if m:
                found.add("mlp" if m.group(2) == "mlp" else m.group(3))
        unsupported = sorted(found - {"q", "k", "v"})
        if unsupported:
            raise ConvertError(f"beacon weights for {unsupported} are not supported (only q, k, v)")
        declared = self.config.get("beacon_param")
        if not found:
            raise ConvertError("checkpoint has no beacon (VST) projections (model.layers.N.self_attn.beacon_"
                               "{q,k,v}_proj): not a Video-XL checkpoint")
        if not declared:
            _log(True, f"convert: warning: config.json has no beacon_param (PyTorch would then build no beacon "
                       f"projections), but the checkpoint has trained beacon_{{{','.join(sorted(found))}}}_proj "
                       "weights; converting them")
        elif set(declared) != found:
            raise ConvertError(f"config.json beacon_param {declared} does not match the beacon projections in the "
                               f"checkpoint ({sorted(found)}); upstream would initialise missing ones as copies of "
                               "q/k/v_proj and ignore extra ones, this converter refuses to guess")
        self.vst_param = [k for k in ("q", "k", "v") if k in found]
        specs, used = [], set()
        _take(ckpt, specs, used, "vst_embd.weight", "model.beacon_embed_tokens.weight", (1, hp.n_embd), "f32",
              "beacon tensor")
        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        for i in range(hp.n_layer):
            for k in self.vst_param:
                rows = q_dim if k == "q" else kv_dim
                h, g = f"model.layers.{i}.self_attn.beacon_{k}_proj", f"blk.{i}.vst_{k}"
                _take(ckpt, specs, used, f"{g}.weight", f"{h}.weight", (rows, hp.n_embd), what="beacon tensor")
                _take(ckpt, specs, used, f"{g}.bias", f"{h}.bias", (rows,), what="beacon tensor")
        return specs, used

    def write_metadata(self, w) -> None:
        super().write_metadata(w)
        w.add_array("x2l.vst.param", self.vst_param)
        w.add_uint32("x2l.vst.window", self.vst_window)
        if self.vst_ratios:
            w.add_array("x2l.vst.train_ratios", [int(r) for r in self.vst_ratios])
        w.add_bool("x2l.vst.accum", self.vst_accum)

    def load_vocab(self) -> Vocab:
        vocab = load_bpe_vocab(self.hf_dir, self.config, self.hp.n_vocab)
        if not vocab.chat_template:
            _log(True, "convert: note: no chat template in the checkpoint; writing Video-XL's qwen_1_5 ChatML template")
            vocab.chat_template = QWEN_CHATML_TEMPLATE
        return vocab


# ----------------------------------------------------------------------------- llama.cpp-layout VLMs in one file
#
# Qwen2-VL / Qwen2.5-VL and SmolVLM2 / Idefics3 are written with the names and keys of llama.cpp's two
# files (model.gguf + mmproj.gguf, docs/families.md §1-§5) in one GGUF: the LLM under its llama.cpp
# architecture, the tower as clip.* keys and v.* / mm.* tensors, as tools/merge_mmproj.py merges a pair.
# The runtime reads such a file with the same code as the pair.

def _vlm_text_config(config: dict, arch: str, owner: str) -> dict:
    """The language model's config (text_config, or the top level of older single-level configs) with
    transformers' defaults for keys a diff-serialized config leaves out; M-RoPE's rope type is kept
    out of the scaling check (its sections are read by the handler)."""
    tc = config.get("text_config")
    cfg = dict(tc) if isinstance(tc, dict) else {k: v for k, v in config.items() if k != "vision_config"}
    cfg = {**TEXT_CONFIG_DEFAULTS[arch], **{k: v for k, v in cfg.items() if v is not None}}
    for key in ("rope_parameters", "rope_scaling"):
        rp = cfg.get(key)
        if isinstance(rp, dict) and rp.get("rope_type", rp.get("type")) in ("mrope", "default") and "mrope_section" in rp:
            cfg[key] = {k: v for k, v in rp.items() if k not in ("mrope_section", "type", "mrope_interleaved")}
            cfg[key]["rope_type"] = "default"
            cfg["_mrope_section"] = list(rp["mrope_section"])
    return cfg


def _vlm_checkpoint_prefix(ckpt, candidates: tuple[str, ...], what: str) -> str:
    for p in candidates:
        if any(n.startswith(p) for n in ckpt.names()):
            return p
    raise ConvertError(f"checkpoint has no {what} tensors (looked for {', '.join(candidates)})")


class PairLayoutHandler(ModelHandler):
    """A VLM written as llama.cpp's model + mmproj pair in one file. Subclasses set the LLM (gguf_arch,
    hp, text), and fill self.vision_keys (clip.* / x2l.* key -> value) and the vision specs in
    vision_plan(ckpt)."""
    is_video = True
    x2l_defaults = False  # the family module (x2l_edge.qwen_vl / smolvlm) owns sampling and chunking
    chat_template_from_processor = True

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        self.vision_keys: dict[str, Any] = {}

    def load_vocab(self) -> Vocab:
        return load_bpe_vocab(self.hf_dir, self.config, self.hp.n_vocab,
                              prefer_processor_template=self.chat_template_from_processor)

    def vision_plan(self, ckpt) -> tuple[list[TensorSpec], set[str]]:
        raise NotImplementedError

    def view(self, ckpt):
        return ckpt

    def tensor_plan(self, ckpt: SafetensorsCheckpoint) -> list[TensorSpec]:
        ckpt = self.view(ckpt)
        specs, used = self.text.tensor_plan(ckpt)
        more, more_used = self.vision_plan(ckpt)
        _check_unused(ckpt, used | more_used, self.hf_arch)
        return rope_freq_tensors(self.hp) + specs + more

    def write_metadata(self, w) -> None:
        self.text.write_metadata(w)
        w.add_bool("clip.has_vision_encoder", True)
        for key, value in self.vision_keys.items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            elif isinstance(value, list):
                w.add_array(key, [float(x) for x in value])
            else:
                w.add_uint32(key, int(value))


def _qwen_canonical(name: str) -> str:
    """transformers 5's in-memory names (model.language_model.*, model.visual.*) -> the saved / hub ones."""
    for old, new in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _preprocessor(hf_dir: Path, names: tuple[str, ...]) -> tuple[dict | None, str | None]:
    for rel in names:
        if (hf_dir / rel).is_file():
            return _read_json(hf_dir / rel), rel
    return None, None


class Qwen2VLHandler(PairLayoutHandler):
    """Qwen2-VL (Qwen2VLForConditionalGeneration): qwen2 LLM with M-RoPE sections (gguf arch qwen2vl), the
    ViT with its Conv3D patch kernel stored as two 2-D kernels (one per frame of a temporal pair), fused
    qkv split in thirds, and the 2x2 patch merger (docs/families.md §2)."""
    hf_arch, gguf_arch, model_kind = "Qwen2VLForConditionalGeneration", "qwen2vl", "qwen2vl"
    projector = "qwen2vl_merger"

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        cfg = _vlm_text_config(config, "qwen2", self.hf_arch)
        self.sections = cfg.pop("_mrope_section", None)
        if not self.sections or len(self.sections) != 3:
            raise ConvertError("config.json has no 3-part rope mrope_section (Qwen2-VL's M-RoPE sections)")
        self.hp = TextHParams.from_config(cfg, "config.json text_config")
        check_text_config(cfg, self.hp, "qwen2", self.hf_arch)
        if 2 * sum(self.sections) != self.hp.head_dim:
            raise ConvertError(f"mrope_section {self.sections} does not cover head_dim {self.hp.head_dim} "
                               "(twice its sum must equal it)")
        self.text = make_text_decoder("qwen2", cfg, self.hp, self.hf_arch)
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ConvertError("config.json is missing required key 'vision_config'")
        self.vc = vc

    def write_metadata(self, w) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections(list(self.sections) + [0])

    def view(self, ckpt):
        return RenamedCheckpoint(ckpt, _qwen_canonical)

    def _tower_dims(self, ckpt) -> tuple[int, int, int]:
        """(width W, patch p, temporal patch) from visual.patch_embed.proj.weight [W, 3, t, p, p]."""
        name = "visual.patch_embed.proj.weight"
        if name not in ckpt:
            raise ConvertError(f"checkpoint is missing vision tensor {name!r}")
        shape = ckpt.shape(name)
        if len(shape) != 5 or shape[1] != 3 or shape[3] != shape[4]:
            raise ConvertError(f"vision tensor {name!r} has shape {list(shape)}; expected [W, 3, t, p, p]")
        if shape[2] != 2:
            raise ConvertError(f"temporal_patch_size {shape[2]} is not supported (2: two frames per patch)")
        return shape[0], shape[3], shape[2]

    def _mlp_plan(self, take, h: str, b: str, W: int, F: int) -> None:
        take(b + "ffn_up.weight", h + "mlp.fc1.weight", (F, W))
        take(b + "ffn_up.bias", h + "mlp.fc1.bias", (F,))
        take(b + "ffn_down.weight", h + "mlp.fc2.weight", (W, F))
        take(b + "ffn_down.bias", h + "mlp.fc2.bias", (W,))

    def _norm_plan(self, take, g: str, h: str, W: int) -> None:
        take(g + ".weight", h + ".weight", (W,))
        take(g + ".bias", h + ".bias", (W,))

    def _ffn_width(self, ckpt) -> int:
        return ckpt.shape("visual.blocks.0.mlp.fc1.weight")[0]

    def vision_plan(self, ckpt):
        W, P, _ = self._tower_dims(ckpt)
        vc, E = self.vc, self.hp.n_embd
        depth = _layer_indices(ckpt, "visual.blocks.")
        if not depth or depth != set(range(len(depth))):
            raise ConvertError(f"vision blocks under visual.blocks. are not numbered 0..N-1: {sorted(depth)}")
        n_layer = len(depth)
        for key, got in (("depth", n_layer), ("embed_dim" if "embed_dim" in vc else "hidden_size", W),
                         ("patch_size", P)):
            if vc.get(key) is not None and vc[key] != got:
                raise ConvertError(f"config.json vision_config.{key} is {vc[key]}, but the checkpoint gives {got}")
        n_head = int(_require(vc, "num_heads", "config.json vision_config"))
        if W % n_head:
            raise ConvertError(f"vision width {W} is not a multiple of num_heads {n_head}")
        merge = int(vc.get("spatial_merge_size", 2))
        if merge != 2:
            raise ConvertError(f"spatial_merge_size {merge} is not supported (2)")
        F = self._ffn_width(ckpt)
        specs, used = [], set()

        def take(g, h, shape, store="auto"):
            _take(ckpt, specs, used, g, h, shape, store, "vision tensor")

        kernel = "visual.patch_embed.proj.weight"
        for t, g in ((0, "v.patch_embd.weight"), (1, "v.patch_embd.weight.1")):
            specs.append(TensorSpec(g, (W, 3, P, P), lambda t=t: np.ascontiguousarray(ckpt.load(kernel)[:, :, t]),
                                    f"{kernel}[:, :, {t}]", "conv"))
        used.add(kernel)
        for i in range(n_layer):
            h, b = f"visual.blocks.{i}.", f"v.blk.{i}."
            qkv_w, qkv_b = h + "attn.qkv.weight", h + "attn.qkv.bias"
            for name, shape in ((qkv_w, (3 * W, W)), (qkv_b, (3 * W,))):
                if name not in ckpt or tuple(ckpt.shape(name)) != shape:
                    raise ConvertError(f"vision tensor {name!r} is missing or not of shape {list(shape)}")
            for k, g in enumerate(("attn_q", "attn_k", "attn_v")):
                rows = slice(k * W, (k + 1) * W)
                specs.append(TensorSpec(f"{b}{g}.weight", (W, W), lambda n=qkv_w, r=rows: ckpt.load(n)[r],
                                        f"{qkv_w}[{k}/3]"))
                specs.append(TensorSpec(f"{b}{g}.bias", (W,), lambda n=qkv_b, r=rows: ckpt.load(n)[r],
                                        f"{qkv_b}[{k}/3]"))
            used |= {qkv_w, qkv_b}
            take(b + "attn_out.weight", h + "attn.proj.weight", (W, W))
            take(b + "attn_out.bias", h + "attn.proj.bias", (W,))
            self._norm_plan(take, b + "ln1", h + "norm1", W)
            self._norm_plan(take, b + "ln2", h + "norm2", W)
            self._mlp_plan(take, h, b, W, F)
        self._norm_plan(take, "v.post_ln", "visual.merger.ln_q", W)
        take("mm.0.weight", "visual.merger.mlp.0.weight", (4 * W, 4 * W))
        take("mm.0.bias", "visual.merger.mlp.0.bias", (4 * W,))
        take("mm.2.weight", "visual.merger.mlp.2.weight", (E, 4 * W))
        take("mm.2.bias", "visual.merger.mlp.2.bias", (E,))

        pre, src = _preprocessor(self.hf_dir, ("preprocessor_config.json", "video_preprocessor_config.json"))
        _check_rescale(pre, src)
        mean = (pre or {}).get("image_mean") or CLIP_MEAN
        std = (pre or {}).get("image_std") or CLIP_STD
        self.vision_keys = {
            "clip.projector_type": self.projector,
            "clip.vision.image_size": 560,  # a placeholder, as llama.cpp writes: the resolution is dynamic
            "clip.vision.patch_size": P,
            "clip.vision.embedding_length": W,
            "clip.vision.feed_forward_length": F,
            "clip.vision.block_count": n_layer,
            "clip.vision.attention.head_count": n_head,
            # The HF ViT's norms hard-code 1e-6 (config.json's rms_norm_eps, when present, is the LLM's).
            "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.projection_dim": E,
            "clip.vision.image_mean": [float(x) for x in mean],
            "clip.vision.image_std": [float(x) for x in std],
        }
        self.vision_keys.update(self.extra_vision_keys())
        return specs, used

    def extra_vision_keys(self) -> dict:
        act = self.vc.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ConvertError(f"vision_config.hidden_act {act!r} is not supported for Qwen2-VL (quick_gelu)")
        return {}


class Qwen25VLHandler(Qwen2VLHandler):
    """Qwen2.5-VL: the Qwen2-VL layout with RMSNorm (no biases), a SwiGLU MLP with biases, and window
    attention except in the full-attention blocks every n_wa_pattern-th (docs/families.md §3)."""
    hf_arch, model_kind = "Qwen2_5_VLForConditionalGeneration", "qwen25vl"
    projector = "qwen2.5vl_merger"

    def _ffn_width(self, ckpt) -> int:
        return ckpt.shape("visual.blocks.0.mlp.up_proj.weight")[0]

    def _mlp_plan(self, take, h, b, W, F):
        for g, hf, shape in (("ffn_gate", "gate_proj", (F, W)), ("ffn_up", "up_proj", (F, W)),
                             ("ffn_down", "down_proj", (W, F))):
            take(f"{b}{g}.weight", f"{h}mlp.{hf}.weight", shape)
            take(f"{b}{g}.bias", f"{h}mlp.{hf}.bias", shape[:1])

    def _norm_plan(self, take, g, h, W):
        take(g + ".weight", h + ".weight", (W,))

    def extra_vision_keys(self) -> dict:
        vc = self.vc
        act = vc.get("hidden_act", "silu")
        if act != "silu":
            raise ConvertError(f"vision_config.hidden_act {act!r} is not supported for Qwen2.5-VL (silu)")
        depth = int(_require(vc, "depth", "config.json vision_config"))
        full = vc.get("fullatt_block_indexes")
        if not isinstance(full, list) or not full:
            raise ConvertError("config.json vision_config has no fullatt_block_indexes (Qwen2.5-VL's full-attention "
                               "blocks)")
        n = int(full[0]) + 1
        if sorted(full) != list(range(n - 1, depth, n)):
            raise ConvertError(f"fullatt_block_indexes {full} are not every {n}-th block: not supported")
        window = int(vc.get("window_size", 112))
        tps = vc.get("tokens_per_second", self.config.get("tokens_per_second", 2))
        return {"clip.use_silu": True, "clip.vision.n_wa_pattern": n, "x2l.vision.window_size": window,
                "x2l.vision.tokens_per_second": float(tps)}


class Idefics3Handler(PairLayoutHandler):
    """Idefics3 (Idefics3ForConditionalGeneration) and SmolVLM2 (SmolVLMForConditionalGeneration): a llama
    LLM, the SigLIP tower with every block and its post-LN applied, the pixel-shuffle connector and a
    bias-free projection (docs/families.md §5)."""
    hf_arch, gguf_arch, model_kind = "Idefics3ForConditionalGeneration", "llama", "idefics3"
    chat_template_from_processor = False

    def __init__(self, hf_dir: Path, config: dict):
        super().__init__(hf_dir, config)
        tc = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        if tc.get("model_type", "llama") != "llama":
            raise ConvertError(f"text_config.model_type {tc.get('model_type')!r} is not supported (llama)")
        cfg = _vlm_text_config(config, "llama", self.hf_arch)
        self.hp = TextHParams.from_config(cfg, "config.json text_config")
        check_text_config(cfg, self.hp, "llama", self.hf_arch)
        self.text = make_text_decoder("llama", cfg, self.hp, self.hf_arch, prefix="model.text_model.")
        self.tie_declared = bool(cfg.get("tie_word_embeddings") or config.get("tie_word_embeddings"))
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ConvertError("config.json is missing required key 'vision_config'")
        self.vc = {**SIGLIP_CONFIG_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}
        self.scale = int(_require(config, "scale_factor"))

    def vision_plan(self, ckpt):
        vc, E = self.vc, self.hp.n_embd
        prefix = "model.vision_model."
        dims = vision_shapes(ckpt, prefix, "siglip", vc, "config.json vision_config")
        if vc["hidden_act"] != "gelu_pytorch_tanh":
            raise ConvertError(f"vision_config.hidden_act {vc['hidden_act']!r} is not supported (gelu_pytorch_tanh)")
        if dims["hidden_size"] % int(vc["num_attention_heads"]):
            raise ConvertError("vision hidden_size is not a multiple of num_attention_heads")
        grid = dims["image_size"] // dims["patch_size"]
        if grid % self.scale:
            raise ConvertError(f"scale_factor {self.scale} does not divide the {grid}x{grid} patch grid")
        pre, src = _preprocessor(self.hf_dir, ("preprocessor_config.json",))
        _check_rescale(pre, src)
        mean = (pre or {}).get("image_mean") or SIGLIP_MEAN
        std = (pre or {}).get("image_std") or SIGLIP_STD
        vt = VisionTower(kind="siglip", prefix=prefix, image_size=dims["image_size"], patch_size=dims["patch_size"],
                         width=dims["hidden_size"], n_ff=dims["intermediate_size"],
                         n_head=int(vc["num_attention_heads"]), eps=float(vc["layer_norm_eps"]), act="gelu_tanh",
                         n_layer_hf=dims["num_hidden_layers"], select_hf=-1, drop_cls=False, mean=mean, std=std,
                         resize="square", resample="lanczos")
        if prefix + "post_layernorm.weight" not in ckpt:
            raise ConvertError(f"checkpoint is missing vision tensor {prefix}post_layernorm.weight")
        specs, used = vision_tensor_plan(ckpt, vt)
        KS = dims["hidden_size"] * self.scale ** 2
        _take(ckpt, specs, used, "mm.model.fc.weight", "model.connector.modality_projection.proj.weight", (E, KS),
              what="projector tensor")
        has_head = self.text.lm_head in ckpt
        if not has_head and not self.tie_declared:
            raise ConvertError(f"checkpoint is missing tensor {self.text.lm_head!r} (config.json does not declare "
                               "tied embeddings)")
        self.hp.tied = not has_head
        self.vision_keys = {
            "clip.projector_type": "idefics3",
            "clip.vision.image_size": dims["image_size"],
            "clip.vision.patch_size": dims["patch_size"],
            "clip.vision.embedding_length": dims["hidden_size"],
            "clip.vision.feed_forward_length": dims["intermediate_size"],
            "clip.vision.block_count": dims["num_hidden_layers"],
            "clip.vision.attention.head_count": int(vc["num_attention_heads"]),
            "clip.vision.attention.layer_norm_epsilon": float(vc["layer_norm_eps"]),
            "clip.vision.projection_dim": E,
            "clip.vision.image_mean": [float(x) for x in mean],
            "clip.vision.image_std": [float(x) for x in std],
            "clip.vision.projector.scale_factor": self.scale,
            "clip.use_gelu": True,
        }
        size = (pre or {}).get("size") or {}
        if isinstance(size, dict) and size.get("longest_edge"):
            self.vision_keys["clip.vision.preproc_image_size"] = int(size["longest_edge"])
        video = ((pre or {}).get("video_sampling") or {}).get("video_size") or {}
        if isinstance(video, dict) and video.get("longest_edge"):
            self.vision_keys["x2l.video.frame_size"] = int(video["longest_edge"])
        return specs, used


class SmolVLMHandler(Idefics3Handler):
    hf_arch, model_kind = "SmolVLMForConditionalGeneration", "smolvlm"


HANDLERS: dict[str, type[ModelHandler]] = {
    h.hf_arch: h for h in (LlamaHandler, Qwen2Handler, LlavaOnevisionHandler, VideoXLHandler, Qwen2VLHandler,
                           Qwen25VLHandler, Idefics3Handler, SmolVLMHandler)}



def make_handler(hf_dir: Path, config: dict) -> ModelHandler:
    archs = config.get("architectures") or []
    if not archs:
        raise ConvertError("config.json has no 'architectures' entry, so the model type is unknown")
    for arch in archs:
        if arch in HANDLERS:
            return HANDLERS[arch](hf_dir, config)
    raise ConvertError(f"unsupported architecture {', '.join(archs)}; supported: {', '.join(HANDLERS)}")


# ----------------------------------------------------------------------------- conversion

def _bar(progress, total: int):
    """A Progress for the tensor loop: a callable's, or a terminal bar when progress is True and
    stderr is a terminal; None when plain lines (or nothing) are printed instead."""
    if progress is False:
        return None
    try:
        from x2l_edge.progress import Progress, _isatty
    except ImportError:  # x2l_edge not installed: lines, as before
        return None
    if callable(progress) and progress is not True:
        return Progress(progress)
    return Progress(True) if _isatty(sys.stderr) else None

def convert(hf_dir, out_path, outtype: str = "f16", progress=True) -> Path:
    """Convert HF_DIR to one GGUF file at OUT_PATH; returns the output path.

    progress: True (the default) draws a bar on a terminal and prints one line per tensor elsewhere
    (logs); False prints nothing but deviations from the outtype; a callable gets
    progress("convert", done, total) after each tensor (x2l_edge/progress.py).

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
    if getattr(handler, "x2l_defaults", True):
        write_x2l_defaults(writer, handler.model_kind, handler.is_video)
    vocab.write(writer)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    types = []
    for spec in specs:
        qtype, note = spec_type(spec, wanted)
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
        progress = True if progress is None else progress
        bar = _bar(progress, len(specs))
        lines = progress is True and bar is None
        for k, (spec, qtype) in enumerate(zip(specs, types), 1):
            data = spec.load()
            if qtype == gguf.GGMLQuantizationType.F16 and np.abs(data).max(initial=0) > 65504:
                _log(True, f"convert: warning: {spec.name} has values beyond the F16 range (they become inf)")
            writer.write_tensor_data(gguf.quants.quantize(data, qtype))
            _log(lines, f"[{k:>{width}}/{len(specs)}] {spec.name:<28} {qtype.name:<5} "
                        f"{'x'.join(map(str, spec.shape))}  <- {spec.source}")
            if bar is not None:
                bar.update("convert", k, len(specs), note=spec.name)
        if bar is not None:
            bar.close()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    _log(progress is True, f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, {len(specs)} tensors)")
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
