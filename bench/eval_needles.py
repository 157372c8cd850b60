#!/usr/bin/env python3
"""Long-context retrieval through the X²L bi-level path on real weights (RULER-style, seeded).

Tasks (generators are deterministic for a given seed and tokenizer):
  single      one "The special magic number for KEY is VALUE." needle in templated filler; ask for it
  multikey    four needles with different keys (same format); ask for one of them
  multivalue  three needles with the same key and different values; ask for all of them
  cwe         common-word extraction (aggregation): a numbered word list in which one word appears far
              more often than the others; ask which word appears most often

The context is cut into chunks of --chunk-tokens tokens and prefilled through Session.prefill_text (bi-level
compression, ratio_low / ratio_high). Modes per sample:
  full        plain Session on the whole prompt (sink + the same context token ids + question): the baseline
  l_only      every chunk's L-KVs reloaded                  (ctx.ask(chunks=all))
  h_only      no reload: H-KVs only                         (ctx.ask(chunks=[]))
  oracle      the chunk(s) that hold the needle(s) reloaded (for cwe: every chunk holding the target word)
  SCORER@k    top-k chunks by ctx.scores(question, SCORER) for SCORER in keys / attention / embedding

Per cell: accuracy (exact match of the needle value(s); cwe: the first word of the answer), the selector's
chunk-recall@k (|selected ∩ needle chunks| / |needle chunks|), resident KV bytes of the decode cache and
wall time. Results go to bench/results/needles_smollm2.{json,md}; every finished sample is appended to a
.jsonl next to them, and a rerun with the same settings resumes from it.

    python bench/eval_needles.py --samples 8 --tokens 2048 --chunk-tokens 256
    python bench/eval_needles.py --tasks single --samples 50           # the full-size run (hours on 2 cores)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

TASKS = ("single", "multikey", "multivalue", "cwe")
SCORERS = ("keys", "attention", "embedding")

# ---------------------------------------------------------------------------------------------- filler
_NAMES = ["Anna", "Boris", "Clara", "Diego", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
          "Mira", "Nils", "Olga", "Pavel", "Rosa", "Samir", "Tara", "Viktor"]
_ADJ = ["quiet", "bright", "old", "narrow", "warm", "heavy", "gentle", "distant", "wooden", "careful", "busy",
        "small", "golden", "cold", "patient", "crowded", "hidden", "simple", "steady", "pale", "green", "rough"]
_NOUN = ["river", "lantern", "garden", "bridge", "window", "market", "letter", "orchard", "harbor", "tower",
         "meadow", "kitchen", "basket", "road", "library", "boat", "forest", "village", "painting", "station",
         "workshop", "island", "staircase", "blanket"]
_PLACE = ["the square", "the hill", "the old mill", "the coast", "the valley", "the north gate", "the museum",
          "the train yard", "the courtyard", "the lake shore", "the bakery", "the chapel"]
_VERB_PAST = ["repaired", "painted", "carried", "visited", "cleaned", "described", "watched", "measured",
              "opened", "followed", "photographed", "ignored", "admired", "sketched", "moved"]
_VERB = ["shines", "waits", "leans", "rests", "sways", "glows", "hums", "drifts", "stands", "sleeps"]
_TIME = ["morning", "evening", "afternoon", "winter", "spring", "night", "summer", "autumn"]
_TEMPLATES = [
    "In the {time}, {name} {vpast} the {adj} {noun} near {place}.",
    "The {adj} {noun} {verb} beside {place} while {name} reads.",
    "{name} said that the {noun} was {adj} and a little {adj2}.",
    "Nobody expected the {noun} at {place} to look so {adj} that {time}.",
    "Every {time}, {name} walks past the {adj} {noun} and the {noun2}.",
    "A {adj} {noun} {verb} over {place}, and {name} {vpast} it twice.",
    "{name} and {name2} {vpast} the {noun} before the {time} ended.",
    "The {noun2} of {place} is {adj}, but its {noun} is {adj2}.",
    "According to {name}, the {adj} {noun} has always {vpast} the {noun2}.",
    "Later that {time}, the {noun} near {place} {verb} in the {adj} light.",
]


def filler_sentence(rng: random.Random) -> str:
    t = rng.choice(_TEMPLATES)
    n1, n2 = rng.sample(_NOUN, 2)
    a1, a2 = rng.sample(_ADJ, 2)
    p1, p2 = rng.sample(_NAMES, 2)
    return t.format(time=rng.choice(_TIME), name=p1, name2=p2, vpast=rng.choice(_VERB_PAST), adj=a1, adj2=a2,
                    noun=n1, noun2=n2, place=rng.choice(_PLACE), verb=rng.choice(_VERB))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _value(rng: random.Random, used: set) -> str:
    while True:
        v = str(rng.randint(100000, 999999))
        if v not in used:
            used.add(v)
            return v


# ---------------------------------------------------------------------------------------------- samples
class Tok:
    """The tokenizer view the generators need: ids of a context text (no special tokens) and token bytes."""

    def __init__(self, session):
        self.s = session

    def ids(self, text: str) -> list[int]:
        return self.s.tokenize(text, special=False)

    def n(self, text: str) -> int:
        return len(self.ids(text))

    def byte_offsets(self, ids: list[int]) -> list[int]:
        """Start byte of every token in the decoded text, plus the total length at the end."""
        off, pos = [], 0
        tb = self.s._tok.token_bytes
        for t in ids:
            off.append(pos)
            pos += len(tb(int(t)))
        off.append(pos)
        return off


def _build(rng, tok: Tok, n_tokens: int, chunk_tokens: int, needles: list[str], chunks: list[int]):
    """Filler sentences up to ~n_tokens with each needle inserted at a sentence boundary inside its target
    chunk (token positions of the context), leaving room so that it does not cross the chunk's end."""
    plan = []
    for text, c in zip(needles, chunks):
        nl = tok.n(" " + text)
        lo = c * chunk_tokens
        hi = min((c + 1) * chunk_tokens, n_tokens) - nl - 24  # 24: longest filler sentence + slack
        if hi <= lo:
            raise ValueError(f"chunk {c} has no room for a needle of {nl} tokens")
        plan.append((rng.randint(lo, hi), text))
    plan.sort()
    spans, ntok, i = {}, 0, 0
    text = ""
    while ntok < n_tokens or i < len(plan):
        if i < len(plan) and ntok >= plan[i][0]:
            piece = plan[i][1]
            i += 1
            is_needle = True
        else:
            piece = filler_sentence(rng)
            is_needle = False
        add = (" " if text else "") + piece
        start = len(text) + (1 if text else 0)
        text += add
        if is_needle:
            spans[piece] = (start, len(text))
        ntok += tok.n(add)
    return text, spans


def locate(tok: Tok, text: str, spans: list[tuple[int, int]], chunk_tokens: int) -> list[list[int]]:
    """Exact chunk indices covered by each character span (ASCII text), from the real tokenization."""
    ids = tok.ids(text)
    off = tok.byte_offsets(ids)
    out = []
    for a, b in spans:
        toks = [j for j in range(len(ids)) if off[j] < b and off[j + 1] > a]
        out.append(sorted({j // chunk_tokens for j in toks}))
    return out


def token_spans(tok: Tok, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last+1) context token index of each character span."""
    ids = tok.ids(text)
    off = tok.byte_offsets(ids)
    out = []
    for a, b in spans:
        toks = [j for j in range(len(ids)) if off[j] < b and off[j + 1] > a]
        out.append((toks[0], toks[-1] + 1))
    return out


def _pick_chunks(rng, n: int, n_chunks: int, distinct: bool = True) -> list[int]:
    if distinct and n <= n_chunks:
        return rng.sample(range(n_chunks), n)
    return [rng.randrange(n_chunks) for _ in range(n)]


def make_sample(task: str, idx: int, tok: Tok, *, n_tokens: int = 2048, chunk_tokens: int = 512,
                seed: int = 0) -> dict:
    """One deterministic sample: context text, question, answer prefix, expected answers, needle chunks."""
    h = int(hashlib.sha256(f"{task}:{idx}:{seed}".encode()).hexdigest()[:12], 16)
    rng = random.Random(h)
    n_chunks = max(1, math.ceil(n_tokens / chunk_tokens))
    used: set = set()
    s = {"task": task, "idx": idx, "seed": seed, "n_tokens_target": n_tokens, "chunk_tokens": chunk_tokens}
    if task == "single":
        key, val = _key(rng), _value(rng, used)
        needles = [f"The special magic number for {key} is {val}."]
        target = [0]
        s.update(question=f"What is the special magic number for {key} mentioned in the provided text?",
                 answer_prefix=f"The special magic number for {key} is", answers=[val], max_tokens=12)
    elif task == "multikey":
        keys = []
        while len(keys) < 4:
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        vals = [_value(rng, used) for _ in keys]
        needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, vals)]
        ask = rng.randrange(len(keys))
        target = [ask]
        s.update(question=f"What is the special magic number for {keys[ask]} mentioned in the provided text?",
                 answer_prefix=f"The special magic number for {keys[ask]} is", answers=[vals[ask]], max_tokens=12,
                 distractors=[v for j, v in enumerate(vals) if j != ask])
    elif task == "multivalue":
        key = _key(rng)
        vals = [_value(rng, used) for _ in range(3)]
        needles = [f"One of the special magic numbers for {key} is {v}." for v in vals]
        target = [0, 1, 2]
        s.update(question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
                 answer_prefix=f"The special magic numbers for {key} are", answers=vals, max_tokens=32)
    elif task == "cwe":
        return _make_cwe(s, rng, tok, n_tokens, chunk_tokens)
    else:
        raise ValueError(f"unknown task {task!r}")
    chunks = _pick_chunks(rng, len(needles), n_chunks, distinct=True)
    text, spans = _build(rng, tok, n_tokens, chunk_tokens, needles, chunks)
    needle_spans = [spans[t] for t in needles]
    located = locate(tok, text, needle_spans, chunk_tokens)
    s.update(context=text, needle_spans=needle_spans, needle_texts=needles,
             needle_token_spans=token_spans(tok, text, needle_spans),
             needle_chunks_all=located,
             needle_chunks=sorted({c for j in target for c in located[j]}))
    s["n_tokens"] = tok.n(text)
    return s


_CWE_WORDS = sorted(set(_NOUN + [w.split()[-1] for w in _PLACE] + ["apple", "copper", "feather", "needle",
                    "pepper", "thunder", "velvet", "marble", "candle", "saddle", "mirror", "ladder", "pillow",
                    "rocket", "jacket", "tunnel", "whistle", "violin", "carpet", "cactus", "helmet", "anchor"]))


def _make_cwe(s, rng, tok: Tok, n_tokens: int, chunk_tokens: int) -> dict:
    """Numbered word list: the target word makes up ~top_share of the entries, every other word a few."""
    words = list(_CWE_WORDS)
    rng.shuffle(words)
    target = words[0]
    per_entry = tok.n(" 123. " + target) + 0.2
    n_entries = max(20, int(n_tokens / per_entry))
    n_target = max(4, n_entries // 8)
    others = words[1:]
    seq = [target] * n_target + [others[j % len(others)] for j in range(n_entries - n_target)]
    rng.shuffle(seq)
    # keep every other word strictly rarer than the target
    spans = []
    text = "Below is a numbered list of words."
    for j, w in enumerate(seq):
        text += f" {j + 1}. "
        if w == target:
            spans.append((len(text), len(text) + len(w)))
        text += w
    located = locate(tok, text, spans, chunk_tokens)
    counts: dict[int, int] = {}
    for cs in located:
        for c in cs:
            counts[c] = counts.get(c, 0) + 1
    s.update(context=text, question="Which word appears most often in the numbered list above?",
             answer_prefix="The word that appears most often is", answers=[target], max_tokens=8,
             target_count=n_target, other_max_count=max(seq.count(w) for w in others),
             needle_chunks=sorted(counts), needle_chunk_counts={str(k): v for k, v in sorted(counts.items())})
    s["n_tokens"] = tok.n(text)
    return s


def is_correct(sample: dict, output: str) -> tuple[bool, float]:
    """(all answers found, fraction of answers found)."""
    out = output.replace(",", "")
    if sample["task"] == "cwe":
        m = re.findall(r"[A-Za-z]+", output)
        ok = bool(m) and m[0].lower() == sample["answers"][0]
        return ok, float(ok)
    hits = [bool(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", out)) for a in sample["answers"]]
    return all(hits), sum(hits) / len(hits)
