"""X2LOptions: every setting of the X²L bi-level prefill and of the questions asked on it, with its
default. This is the one place the defaults live; a model's GGUF may override some of them (``x2l.*``
keys written by tools/convert.py), and ``X2LOptions.for_model`` is the one place those are read."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class X2LOptions:
    # Compression (the bi-level prefill)
    # L-KVs (host tier): keep 1/ratio_low of each chunk's entries. 1 (uncompressed), not the method's 2: at 2
    # no training-free compressor reached 95 % of full KV at top-3 on both held-out needle tasks
    # (bench/results/compressors_smollm2_n50.md and, on unseen samples, compressors_smollm2_test100_*.md,
    # n=50 each: snapkv loses them all; keydiff + merge 96-98 % single but 82-84 % multi-key, keydiff with
    # pool_scope "layers" 90-92 % single, 92-97 % multi-key; ratio_low 1: 100 % and 97 %; on idx 150-199
    # (compressors_smollm2_test150_attention.md) every rule 77-85 % multi-key).
    ratio_low: int = 1
    ratio_high: int = 32            # H-KVs (device tier): keep 1/ratio_high
    low_type: str = "f16"           # L tier storage: f32, f16, q8_0, q4_0
    high_type: str = "q8_0"         # H tier storage (for_model: f16 when heads are narrower than a q8_0 block)
    pin_ends: bool = False          # first/last chunk at ratio_low in the H pass too
    two_pass: bool = True           # official semantics: the H pass runs on top of the H-KVs
    obs_window: int = 0             # queries at the chunk's end that vote; 0 = all
    pool_kernel: int = 5            # neighbour smoothing of the votes
    max_host_bytes: int = 0         # budget for the L tier (0 = unlimited)
    max_device_bytes: int = 0       # budget for sink + H tier + working buffers (0 = unlimited)
    # "snapkv", "kvzip", "keydiff", "hybrid" (training-free, any model: cpp/x2l/x2l.h X2LOptions::compressor) or
    # "beacon" (Video-XL's learned VSTs)
    compressor: str = "snapkv"
    high_compressor: str = ""       # the H tier's own training-free rule ("" = compressor; two passes)
    repeat_prompt: str | tuple | None = None  # kvzip: text (or token ids) between a chunk and its copy
    max_votes: bool = False         # snapkv: each entry's largest vote instead of its mean (pooled votes)
    # Which entries share one choice: "head" (each layer and KV head its own), "layers" (per KV head, the
    # same entries in every layer: importance ranks averaged over layers), "all" (the same tokens everywhere)
    pool_scope: str = "head"
    merge: bool = False             # training-free: a dropped entry's value merged into its more similar kept neighbour
    merge_min_similarity: float = 0.0  # merge: only where the keys' cosine is at least this (near-duplicates); 0: all
    # Training-free: number each tier's entries densely as the official code does (the question follows the
    # last entry, not the last token; 1-D RoPE models only). docs/x2l.md "Dense positions".
    dense_positions: bool = False
    prefill_low_cache_bytes: int = -1  # CUDA, discrete GPUs: L bytes kept in device memory (-1: half the free)
    # Questions
    # Positions left empty between a dense training-free cache (dense_positions) and the question; other
    # indexes ignore it (docs/x2l.md "Question gap").
    question_gap: int = 0
    top_k: int = 3                  # chunks whose L-KVs a question reloads (select="top_k")
    # "attention" (the question's queries over every chunk's L keys; reads the whole L tier), or the
    # resident "maxsim" (question tokens vs each chunk's distinctive input rows: no model pass, no H or L
    # row, ~1000x cheaper; held out, n = 50 per task, chunk recall@3 50/50 single and 50/50 multi-key
    # needles against attention's 50/50 and 49/50, the tiny-VLM card's chunk first 32/32: bench/README.md
    # "maxsim"). Not the default: that evidence is needles whose question shares words with the answer and
    # a tiny VLM whose frame tokens are trained into the word-embedding space; no real VLM family was
    # measured. Also "high" / "high_keys" (H keys, + signatures), "keys" (signatures), "embedding", or
    # "external" (docs/x2l.md "Per question").
    scorer: str = "attention"
    # How many ranked chunks to reload: "top_k", or by the shape of the sorted scores: "gap" (cut at the
    # largest drop) or "mass" (the chunks holding mass_p of softmax(scores / sd)), at most max_k of them
    # (cpp/x2l/select.h SelectRule). budget_bytes (per question) caps any rule.
    select: str = "top_k"
    max_k: int = 6
    mass_p: float = 0.9
    # Video input
    chunk_frames: int = 10          # frames per chunk
    frames_default: int = 32        # frames sampled when the caller gives neither max_frames nor fps

    # The fields _core.X2LPrefill takes.
    PREFILL = ("ratio_low", "ratio_high", "low_type", "high_type", "pin_ends", "two_pass", "obs_window",
               "pool_kernel", "max_host_bytes", "max_device_bytes", "compressor", "prefill_low_cache_bytes", "max_votes",
               "pool_scope", "merge", "merge_min_similarity", "dense_positions",
               "high_compressor")

    def prefill_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in self.PREFILL}

    POOL_SCOPES = ("head", "layers", "all")
    SCORERS = ("attention", "keys", "embedding", "high", "high_keys", "maxsim", "external")
    SELECT_RULES = ("top_k", "gap", "mass")

    def selection_kwargs(self) -> dict:
        """The question-time selection defaults a VideoContext takes."""
        return {"rule": self.select, "max_k": self.max_k, "mass_p": self.mass_p}

    # The fields that act only when a question is asked (an index made with any of them serves every value).
    QUESTION = ("question_gap", "top_k", "scorer", "select", "max_k", "mass_p")

    def question_kwargs(self) -> dict:
        """Every question-time default a VideoContext takes from these options (QUESTION)."""
        return {"default_top_k": self.top_k, "default_scorer": self.scorer,
                "default_selection": self.selection_kwargs(), "question_gap": self.question_gap}

    def replace(self, **overrides) -> "X2LOptions":
        """A copy with these fields changed (TypeError naming an unknown option)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown X²L option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **overrides)

    # Allowed range of each int field (bool fields must be bools, str fields strs: __post_init__).
    _RANGES = {"ratio_low": (1, 2**31 - 1), "ratio_high": (1, 2**31 - 1), "obs_window": (0, 2**31 - 1),
               "pool_kernel": (1, 2**31 - 1), "max_host_bytes": (0, 2**64 - 1), "max_device_bytes": (0, 2**64 - 1),
               "prefill_low_cache_bytes": (-1, 2**63 - 1), "top_k": (0, 2**31 - 1), "chunk_frames": (1, 2**31 - 1),
               "frames_default": (1, 2**31 - 1), "max_k": (1, 2**31 - 1),
               "question_gap": (0, 1 << 20)}

    def __post_init__(self) -> None:
        """Every field checked by type and range (TypeError / ValueError naming it; no coercion)."""
        from . import checks

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in self._RANGES:
                lo, hi = self._RANGES[f.name]
                checks.integer(f.name, v, lo=lo, hi=hi)
            elif f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise TypeError(f"{f.name} must be a bool (got {type(v).__name__} {v!r})")
            elif f.type in ("str", str) and not isinstance(v, str):
                raise TypeError(f"{f.name} must be a str (got {type(v).__name__} {v!r})")
            elif f.type in ("float", float):
                checks.real(f.name, v)
        checks.real("mass_p", self.mass_p, lo=0.0, hi=1.0, lo_open=True)
        checks.real("merge_min_similarity", self.merge_min_similarity, lo=0.0, hi=1.0)
        for name, allowed in (("scorer", self.SCORERS), ("select", self.SELECT_RULES), ("pool_scope", self.POOL_SCOPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")

    @classmethod
    def for_model(cls, session, *, video: bool, **overrides) -> "X2LOptions":
        """The defaults for this session's model, then overrides. Every model: H rows in f16 when its heads
        are narrower than a q8_0 block (tiny test models). Video (video=True): the model's GGUF x2l.*
        values (ratio_low, ratio_high, pin_ends, top_k, chunk_frames, frames_default), and the beacon
        compressor when the model ships Video-XL's summarisation tokens (x2l.vst.param)."""
        o = cls()
        o.high_type = "q8_0" if session.info["head_dim"] % 32 == 0 else "f16"
        if video:
            meta = session._meta
            o.ratio_low = int(meta("x2l.ratio_low", o.ratio_low))
            o.ratio_high = int(meta("x2l.ratio_high", o.ratio_high))
            o.pin_ends = bool(meta("x2l.pin_ends", o.pin_ends))
            o.top_k = int(meta("x2l.top_k", o.top_k))
            o.chunk_frames = int(meta("x2l.chunk_frames", o.chunk_frames))
            o.frames_default = int(meta("x2l.frames_default", o.frames_default))
            o.compressor = "beacon" if meta("x2l.vst.param") else "snapkv"
        return o.replace(**overrides)
