"""The friendly Python API: Session(path).generate / chat / tokenize / detokenize."""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

from . import _core
from . import chat as _chat


def _utf8_split(buf: bytes) -> tuple[str, bytes]:
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


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could start one of the stop strings."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _prefill(core, ids: list[int]) -> None:
    """Make core's context equal ids, reusing the longest common prefix already in its cache."""
    if not ids:
        raise ValueError("the prompt is empty")
    common = 0
    for a, b in zip(core.history, ids):
        if a != b:
            break
        common += 1
    common = min(common, len(ids) - 1)  # re-evaluate at least the last token to get its logits
    core.truncate(common)
    if len(ids) > core.n_ctx:
        raise _core.BudgetError(f"prompt has {len(ids)} tokens but only {core.n_ctx} fit")
    core.eval(ids[common:])


def _generate_ids(core, prompt_ids, *, stop_ids, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                  repeat_penalty=1.0, repeat_last_n=64, seed=0) -> Iterator[int]:
    """Greedy/sampled generation on any core with eval/sample/truncate/history (LlmSession, X2LDecoder)."""
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    sampler = _core.Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    stops = set(stop_ids)
    _prefill(core, [int(i) for i in prompt_ids])

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


def _stream_text(tok, ids: Iterator[int], stop: Sequence[str]) -> Iterator[str]:
    """Turn token ids into text pieces: whole UTF-8 characters only, cut at the first stop string."""
    buf = b""
    pending = ""
    for t in ids:
        buf += tok.token_bytes(t)
        text, buf = _utf8_split(buf)
        pending += text
        for s in stop:
            idx = pending.find(s)
            if idx >= 0:
                if idx:
                    yield pending[:idx]
                return
        hold = _held_suffix(pending, stop)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += buf.decode("utf-8", errors="replace")
    if pending:
        yield pending


class Session:
    """A loaded model with its context.

    >>> s = Session(x2l_edge.models.smollm2_path())
    >>> s.chat("What is the capital of France?")
    """

    def __init__(self, model_path: str | os.PathLike, *, n_threads: int = 0, n_ctx: int = 0,
                 kv_type: str = "f16", n_batch: int = 256, device: str = "auto"):
        path = os.fspath(model_path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda:N' (got {device!r})")
        if not isinstance(n_threads, int) or n_threads < 0:
            raise ValueError("n_threads must be an int >= 0 (0 = all cores)")
        self._s = _core.LlmSession(path, n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch)
        self._tok = self._s.tokenizer
        self.path = path
        self.device = "cpu"  # the CUDA LLM path is not wired into Session yet
        self.chat_template = self._s.metadata("tokenizer.chat_template")
        self._stop_ids = {i for i in (self._tok.eos_id, self._tok.eot_id) if i is not None and i >= 0}
        im_end = self._tok.encode("<|im_end|>", parse_special=True)
        if len(im_end) == 1 and self._tok.token_bytes(im_end[0]) == b"<|im_end|>":
            self._stop_ids.add(im_end[0])

    # ------------------------------------------------------------------ info
    @property
    def info(self) -> dict:
        return self._s.info()

    def memory(self) -> dict:
        """Bytes used: weights (mapped), KV cache, scratch workspace."""
        return self._s.memory()

    @property
    def n_ctx(self) -> int:
        return self._s.n_ctx

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        return list(self._tok.encode(text, parse_special=special, add_bos=add_bos))

    def detokenize(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special=skip_special).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ low level
    def eval(self, ids: Sequence[int], *, all_logits: bool = False):
        """Append tokens to the context (reusing nothing). Returns [n, n_vocab] logits if all_logits."""
        return self._s.eval([int(i) for i in ids], all_logits=all_logits)

    def logits(self):
        return self._s.logits()

    def reset(self) -> None:
        self._s.truncate(0)

    def generate_ids(self, prompt_ids: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                     repeat_last_n: int = 64, seed: int = 0, stop_ids: Iterable[int] | None = None) -> Iterator[int]:
        """Yield generated token ids (stop tokens excluded), reusing the cached common prefix."""
        return _generate_ids(self._s, prompt_ids, stop_ids=self._stop_ids if stop_ids is None else stop_ids,
                             max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)

    def _stream(self, prompt_ids, stop: Sequence[str], gen) -> Iterator[str]:
        return _stream_text(self._tok, self.generate_ids(prompt_ids, **gen), stop)

    # ------------------------------------------------------------------ text API
    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int = 0, stop: Sequence[str] | str = (),
                 stream: bool = False, add_bos: bool | None = None):
        """Complete a raw prompt. Returns the text, or an iterator of text pieces with stream=True."""
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if s]
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_bos=self._tok_adds_bos() if add_bos is None else add_bos)
        else:
            ids = [int(i) for i in prompt]
        gen = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        it = self._stream(ids, stop, gen)
        return it if stream else "".join(it)

    def chat_prompt(self, messages, *, system: str | None = None, add_generation_prompt: bool = True) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        bos = self._tok.token_bytes(self._tok.bos_id).decode("utf-8", "replace") if self._tok.bos_id >= 0 else ""
        eos = self._tok.token_bytes(self._tok.eos_id).decode("utf-8", "replace") if self._tok.eos_id >= 0 else ""
        return _chat.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                            bos_token=bos, eos_token=eos)

    def chat(self, messages, *, system: str | None = None, stream: bool = False, **gen):
        """Answer a user message (str) or a list of {'role','content'} messages with the model's template."""
        prompt = self.chat_prompt(messages, system=system)
        return self.generate(prompt, stream=stream, add_bos=False, **gen)

    # ------------------------------------------------------------------ X²L
    def prefill_text(self, text: str, *, chunk_tokens: int = 512, system: str | None = None,
                     progress=None, **x2l_options):
        """Index a long text with bi-level KV compression (the same path video takes): the text is cut into
        chunks of chunk_tokens tokens; returns a VideoContext to ask questions on.

        Options: ratio_low (2), ratio_high (32), low_type ('f16'), high_type ('q8_0'), pin_ends, two_pass,
        obs_window, pool_kernel, max_host_bytes, max_device_bytes, top_k (default for questions), scorer."""
        from .x2l import VideoContext, prefill_chunks, split_template

        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty str")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError("chunk_tokens must be a positive int")
        top_k = x2l_options.pop("top_k", 3)
        scorer = x2l_options.pop("scorer", "keys")
        prefix, suffix = split_template(self, system)
        ids = self.tokenize(text, special=False)
        chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
        index, stats = prefill_chunks(self, chunks, sink_ids=self.tokenize(prefix), n_chunks=len(chunks),
                                      progress=progress, **x2l_options)
        ctx = VideoContext(self, index, question_prefix="\n", question_suffix=suffix, default_top_k=top_k,
                           default_scorer=scorer)
        ctx.prefill_stats = stats
        return ctx

    def _tok_adds_bos(self) -> bool:
        return bool(self._s.metadata("tokenizer.ggml.add_bos_token") or False)
