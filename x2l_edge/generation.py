"""The token loop and text streaming shared by every answering path.

A *core* is anything with eval / sample / truncate / history / n_past / n_ctx: the session's own
context (``_core.LlmSession``) and an X²L mixed cache (``_core.X2LDecoder``) both are, so plain chat,
the full-KV video baseline and X²L answers run the same loop and stream text the same way.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from . import _core, checks

# Sampling keyword arguments that generate_ids() accepts (Session.ask passes these through).
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")


def utf8_split(buf: bytes) -> tuple[str, bytes]:
    """Decode the longest complete UTF-8 prefix of buf; return (text, leftover bytes)."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError as e:
            if e.reason == "invalid start byte" or e.start < cut - 3:
                # Truly invalid bytes (not a truncated tail): replace them rather than stall.
                return buf.decode("utf-8", errors="replace"), b""
            continue
    return "", buf


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could start one of the stop strings."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def prefill(core, ids: list[int]) -> None:
    """Make core's context equal ids, reusing the longest common prefix already in its cache."""
    if not ids:
        raise ValueError("the prompt is empty")
    common = 0
    for a, b in zip(core.history, ids):
        if a != b:
            break
        common += 1
    # Re-evaluate at least the last two tokens: a forward of >= 2 rows computes every row exactly as
    # the whole prompt's forward would (the CPU kernels), while a single row takes the decode kernels,
    # whose rounding differs. So an answer does not depend on what the cache held before (another
    # request's prompt on a shared session), only on the prompt.
    common = min(common, max(len(ids) - 2, 0))
    core.truncate(common)
    if len(ids) > core.n_ctx:
        raise _core.BudgetError(f"prompt has {len(ids)} tokens but only {core.n_ctx} fit")
    core.eval(ids[common:])


def generate_ids(core, prompt_ids, *, stop_ids, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repeat_penalty=1.0, repeat_last_n=64, seed=0) -> Iterator[int]:
    """Greedy/sampled generation on any core (LlmSession, X2LDecoder): the prompt is prefilled now,
    tokens are yielded lazily (stop tokens excluded)."""
    args = checks.sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens)
    max_tokens = args.pop("max_tokens")
    sampler = _core.Sampler(**args)
    stops = set(stop_ids)
    # -1: a cached embedding row (LlmSession.kEmbeddingToken), valid only inside the reused prefix (the
    # native eval refuses it anywhere else)
    prefill(core, checks.integers("prompt token ids", prompt_ids, lo=-1))

    def gen():
        for i in range(max_tokens):
            tok = core.sample(sampler)
            if tok in stops:
                return
            yield tok
            if i + 1 < max_tokens:
                if core.n_past >= core.n_ctx:
                    return  # context full: stop cleanly
                core.eval([tok])

    return gen()


def stream_text(tok, ids: Iterator[int], stop: Sequence[str]) -> Iterator[str]:
    """Turn token ids into text pieces: whole UTF-8 characters only, cut at the first stop string."""
    buf = b""
    pending = ""
    for t in ids:
        buf += tok.token_bytes(t)
        text, buf = utf8_split(buf)
        pending += text
        for s in stop:
            idx = pending.find(s)
            if idx >= 0:
                if idx:
                    yield pending[:idx]
                return
        hold = held_suffix(pending, stop)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += buf.decode("utf-8", errors="replace")
    if pending:
        yield pending
