"""Video-X²L on a Session: bi-level prefill into a tiered KV index, then per question scoring,
top-k selection, asynchronous L-KV reload and decoding on the mixed cache.

    ctx = session.prefill_text(long_text, chunk_tokens=512)       # or session.prefill(video) for video
    ctx.scores("Where is the key?", scorer="attention")             # per-chunk relevance (numpy)
    ctx.ask("Where is the key?", top_k=3)                           # select, reload, answer
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Sequence

import numpy as np

from . import _core, checks
from .generation import generate_ids, stream_text
from .options import X2LOptions
from .progress import scope as progress_scope

SCORERS = X2LOptions.SCORERS
SELECT_RULES = X2LOptions.SELECT_RULES
TRAINING_FREE = ("snapkv", "kvzip", "keydiff", "hybrid")
COMPRESSORS = TRAINING_FREE + ("beacon",)
# kvzip's prompt between a chunk and its copy (the wording the compressors were explored with).
REPEAT_PROMPT_TEXT = "\n\nRepeat the text above exactly:\n"
REPEAT_PROMPT_VIDEO = "\nRepeat the video above exactly:\n"
_MARK = "\x00X2L_CONTENT\x00"


def split_template(session, system: str | None) -> tuple[str, str]:
    """(prefix, suffix) of a one-user-message chat prompt: the sink is the prefix (system prompt and
    the start of the user turn); each question is sent as '\\n' + question + suffix."""
    prompt = session.chat_prompt([{"role": "user", "content": _MARK}], system=system)
    if prompt.count(_MARK) != 1:
        raise ValueError("cannot locate the user message in the chat template")
    prefix, suffix = prompt.split(_MARK)
    return prefix, suffix


class VideoContext:
    """A prefilled input (video or long text): its sink, per-chunk L-KVs (host tier) and H-KVs
    (quantized, device tier), and a decoder that answers questions on mixed caches."""

    def __init__(self, session, index, *, question_prefix: str = "\n", question_suffix: str = "",
                 answer_prefix: str = "", max_answer_tokens: int = 512, default_top_k: int = X2LOptions.top_k,
                 default_scorer: str = X2LOptions.scorer, default_selection: dict | None = None,
                 question_gap: int = X2LOptions.question_gap):
        self.session = session
        self.index = index
        self.question_prefix = question_prefix
        self.question_suffix = question_suffix
        # Text the answer starts with (after the assistant header), e.g. "Best Option: (". It is part
        # of every decode but not of scoring: its tokens often name what the question asks about.
        self.answer_prefix = answer_prefix
        self.max_answer_tokens = max_answer_tokens
        self.default_top_k = default_top_k
        self.default_scorer = default_scorer
        if default_scorer == "maxsim" and any(index.chunk_info(c)["signature_rows"] == 0 for c in range(index.n_chunks)):
            # an index saved before the row signatures (formats 3 and 4)
            warnings.warn("x2l-edge: this index has no row signatures for the maxsim scorer (saved by an older "
                          "version): its questions use the attention scorer; index the input again for maxsim",
                          RuntimeWarning, stacklevel=2)
            self.default_scorer = "attention"
        # rule ("top_k", "gap", "mass"), max_k, mass_p: X2LOptions.selection_kwargs()
        self.default_selection = dict(X2LOptions().selection_kwargs(), **(default_selection or {}))
        with session._lock.op():
            # question_gap: empty positions before the question on a dense training-free index (X2LOptions)
            lo, hi = X2LOptions._RANGES["question_gap"]
            self._dec = _core.X2LDecoder(session._s, index, max_tail_tokens=max_answer_tokens + 512,
                                         question_gap=checks.integer("question_gap", question_gap, lo=lo, hi=hi))
        if getattr(session, "device", "cpu") != "cpu" and not self._dec.on_device:
            warnings.warn(f"x2l-edge: {self._dec.device_note}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ inspection
    @property
    def n_chunks(self) -> int:
        return self.index.n_chunks

    def chunk_info(self, i: int) -> dict:
        return self.index.chunk_info(i)

    def memory(self) -> dict:
        """Bytes per tier: sink, H (device), L (host), signatures, the reload working set and what the
        current mixed cache keeps resident."""
        m = dict(self.index.memory())
        with self.session._lock.op():
            m["working_bytes"] = self._dec.working_bytes()
            m["resident_bytes"] = self._dec.resident_bytes()
        m["device_bytes"] = m["sink_bytes"] + m["high_bytes"] + m["working_bytes"]
        m["host_bytes"] = m["low_bytes"]
        return m

    def question_ids(self, question: str, *, answer_prefix: bool = True) -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty str")
        text = self.question_prefix + question + self.question_suffix
        return self.session.tokenize(text + self.answer_prefix if answer_prefix else text)

    # ------------------------------------------------------------------ selection
    def scores(self, question: str, scorer: str | None = None) -> np.ndarray:
        """Relevance of every chunk to the question: 'attention' (the question's queries, from a pass over
        the H-only cache, attend to every chunk's L keys without RoPE; mass per chunk), the resident ones
        that never read the L tier: 'high' (the same queries at their own positions attend to every
        chunk's H keys as stored: the question's own attention over the H tier), 'high_keys' (H keys and
        the key signatures in one softmax), 'keys' (the signature alone: the 8 most distinctive pre-RoPE
        keys per chunk, layer and KV head, taken before compression), 'maxsim' (each question token's best
        cosine with a chunk's distinctive input rows, kept at prefill; no model pass) and 'embedding'
        (input-embedding similarity). All but embedding and maxsim score a chunk by its peak significance: the most mass one
        question token gives it, minus its median mass over the question and the template tokens after
        it, over sqrt(median) (select.h peak_significance). score_stats() says what the call read."""
        scorer = scorer or self.default_scorer
        if scorer == "external":
            raise ValueError("scorer='external' means you pass scores or chunks yourself (select(scores=...))")
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS} (got {scorer!r})")
        ids = self.question_ids(question, answer_prefix=False)
        # Only the question's own tokens vote: the template around it is the same for every question.
        head = len(self.session.tokenize(self.question_prefix))
        tail = len(self.session.tokenize(self.question_suffix))
        begin, end = head, len(ids) - tail
        if end <= begin:
            begin, end = 0, len(ids)
        with self.session._lock.op():
            return np.asarray(self._dec.scores(ids, scorer, begin, end), dtype=np.float32)

    def score_stats(self) -> dict:
        """The last scores() call: bytes of index rows its chunk scan read per tier (low_bytes: the L
        tier; high_bytes, signature_bytes: resident) and its seconds (pass_seconds: the question's
        pass over the H-only cache, which reads sink + H; scan_seconds: the chunk scan)."""
        with self.session._lock.op():
            return dict(self._dec.score_stats())

    def select(self, scores: Sequence[float] | None = None, *, question: str | None = None,
               scorer: str | None = None, top_k: int | None = None, budget_bytes: int = 0,
               include_first: bool = False, include_last: bool = False, rule=None, max_k: int | None = None,
               mass_p: float | None = None) -> list[int]:
        """The chunks to reload, in temporal order. rule (default: the context's, X2LOptions.select):
        'top_k' the top_k best (or, with budget_bytes > 0, as many as the budget holds), 'gap' cut the
        ranked scores at their largest drop, 'mass' the fewest chunks holding mass_p of
        softmax(scores / sd(scores)); both at most max_k (cpp/x2l/select.h SelectRule), then capped by
        budget_bytes (the chunks' extra L bytes). rule may also be a callable: rule(scores) -> chunk
        indices (numpy scores in, any iterable of ints out), your own selection."""
        if scores is None:
            if question is None:
                raise ValueError("give scores or a question")
            scores = self.scores(question, scorer)
        scores = [checks.real(f"scores[{i}]", s) for i, s in enumerate(scores)]
        if len(scores) != self.n_chunks:
            raise ValueError(f"got {len(scores)} scores for {self.n_chunks} chunks")
        rule = self.default_selection["rule"] if rule is None else rule
        if callable(rule):
            chosen = rule(np.asarray(scores, dtype=np.float32))
            return sorted(set(checks.integers("chunks chosen by rule", chosen, lo=0, hi=self.n_chunks - 1)))
        if rule not in SELECT_RULES:
            raise ValueError(f"rule must be one of {SELECT_RULES} or a callable (got {rule!r})")
        k = checks.integer("top_k", self.default_top_k if top_k is None else top_k, lo=0)
        budget_bytes = checks.integer("budget_bytes", budget_bytes, lo=0)
        max_k = checks.integer("max_k", self.default_selection["max_k"] if max_k is None else max_k, lo=1, hi=2**31 - 1)
        mass_p = checks.real("mass_p", self.default_selection["mass_p"] if mass_p is None else mass_p, lo=0.0, hi=1.0,
                             lo_open=True)
        return list(_core.select_chunks(self.index, scores, top_k=k, budget_bytes=int(budget_bytes),
                                        include_first=include_first, include_last=include_last, rule=rule,
                                        max_k=max_k, mass_p=mass_p))

    def reload(self, chunks: Iterable[int]) -> None:
        """Build the mixed cache for these chunks; their L-KVs are copied on a background thread, layer by
        layer, while the question's prefill runs."""
        chunks = sorted(checks.integers("chunks", chunks, lo=0, hi=self.n_chunks - 1))
        with self.session._lock.op():
            self._dec.prepare(chunks)

    @property
    def selected(self) -> list[int]:
        with self.session._lock.op():
            return list(self._dec.selected)

    def reload_stats(self) -> dict:
        with self.session._lock.op():
            return dict(self._dec.reload_stats())

    # ------------------------------------------------------------------ answering
    def generate(self, question: str, *, chunks: Iterable[int] | None = None, top_k: int | None = None,
                 scorer: str | None = None, scores: Sequence[float] | None = None, budget_bytes: int = 0,
                 include_first: bool = False, include_last: bool = False, max_tokens: int = 64,
                 stop: Sequence[str] = (), stream: bool = False, cancel=None, rule=None, max_k: int | None = None,
                 mass_p: float | None = None, **sampling):
        """Answer a question: choose chunks (given, from scores, or from a scorer, by select()'s rule),
        reload, decode. The whole answer is one operation on the session (a stream holds it until it
        ends or is closed)."""
        shape = dict(rule=rule, max_k=max_k, mass_p=mass_p)
        if stream:
            return self.session._lock.stream(
                lambda: self._answer(question, chunks, top_k, scorer, scores, budget_bytes, include_first,
                                     include_last, max_tokens, stop, sampling, shape), cancel)
        with self.session._lock.op(cancel):
            return "".join(self._answer(question, chunks, top_k, scorer, scores, budget_bytes, include_first,
                                        include_last, max_tokens, stop, sampling, shape))

    ask = generate

    def _answer(self, question, chunks, top_k, scorer, scores, budget_bytes, include_first, include_last,
                max_tokens, stop, sampling, shape):
        if chunks is None:
            k = checks.integer("top_k", self.default_top_k if top_k is None else top_k, lo=0)
            budget_bytes = checks.integer("budget_bytes", budget_bytes, lo=0)
            rule = self.default_selection["rule"] if shape["rule"] is None else shape["rule"]
            if rule == "top_k" and k == 0 and budget_bytes == 0 and not include_first and not include_last:
                chunks = []
            elif scores is not None or (scorer or self.default_scorer) != "external":
                chunks = self.select(scores, question=question, scorer=scorer, top_k=k, budget_bytes=budget_bytes,
                                     include_first=include_first, include_last=include_last, **shape)
            else:
                raise ValueError("scorer='external' needs scores= or chunks=")
        self.reload(chunks)
        ids = generate_ids(self._dec, self.question_ids(question), stop_ids=self.session._stop_ids,
                            max_tokens=max_tokens, **sampling)
        return stream_text(self.session._tok, ids, [s for s in ([stop] if isinstance(stop, str) else stop) if s])

    def logits(self, question: str, chunks: Iterable[int]) -> np.ndarray:
        """Logits of every question token on the mixed cache for these chunks (for tests and analysis)."""
        ids = self.question_ids(question)
        with self.session._lock.op():
            self.reload(chunks)
            return self._dec.eval(ids, all_logits=True)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        self.index.save(os.fspath(path))

    @classmethod
    def load(cls, session, path: str | os.PathLike, *, system: str | None = None, mmap: bool = False,
             **kw) -> "VideoContext":
        """Load a saved index, checked field by field and by checksum (docs/security.md). mmap=False
        reads it into memory: nothing done to the file afterwards can change or crash this context.
        mmap=True keeps the L tier in a read-only mapping of the file (indexes larger than RAM): each
        chunk's L rows are verified before their first use and the file is re-checked for changes
        before every use. The question suffix is rebuilt from the session's chat template (an index of a
        Qwen2-VL video: prefix and suffix as qwen_vl lays out the question after a video; for a
        SmolVLM2 video pass smolvlm.context_kwargs()); pass question_prefix/question_suffix to override."""
        index = _core.VideoIndex.load(os.fspath(path), mmap=bool(mmap))
        # An M-RoPE text position: a Qwen2-VL video prefill (another model's index is refused below).
        video_kwargs = session._video_question_kwargs(system) if index.settings()["text_pos"] >= 0 else None
        if video_kwargs is not None:
            kw = {**video_kwargs, **kw}
        elif "question_suffix" not in kw:
            kw["question_suffix"] = split_template(session, system)[1]
        return cls(session, index, **kw)


def prefill_chunks(session, chunks: Iterable, *, sink_ids: Sequence[int], n_chunks: int | None = None,
                   frames_per_chunk: int | None = None, progress=None,
                   options: X2LOptions | None = None, **overrides):
    """Run the bi-level prefill over chunks given as token-id lists or embedding arrays [n, n_embd], with
    `options` (X2LOptions(), the plain defaults, when None) and any X2LOptions fields in overrides.

    Memory stays bounded by one chunk's full KV plus the growing tiers; the chunk iterator is consumed
    lazily (a video's frames are decoded and encoded chunk by chunk). Ctrl-C between chunks stops cleanly.
    progress: reports step 'index' after each chunk (both passes), as x2l_edge/progress.py describes.
    compressor 'kvzip' re-reads every chunk after options.repeat_prompt (text or token ids; None:
    REPEAT_PROMPT_TEXT for token chunks, REPEAT_PROMPT_VIDEO for embedding chunks)."""
    steps = prefill_steps(session, chunks, sink_ids=sink_ids, options=options, frames_per_chunk=frames_per_chunk,
                          **overrides)
    with progress_scope(progress) as prog:
        prog.update("index", 0, n_chunks)
        while True:
            try:
                done = next(steps)
            except StopIteration as stop:
                index, stats = stop.value
                break
            prog.update("index", done, n_chunks)
    if getattr(session, "device", "cpu") != "cpu" and stats["device_note"]:
        warnings.warn(f"x2l-edge: {stats['device_note']}", RuntimeWarning, stacklevel=3)
    return index, stats


def prefill_steps(session, chunks: Iterable, *, sink_ids: Sequence[int], frames_per_chunk: int | None = None,
                  options: X2LOptions | None = None, **overrides):
    """prefill_chunks one chunk at a time: a generator that yields the number of chunks done after each
    one and returns (index, stats). A caller that shares the model between several tasks (the server)
    can run other model calls between two chunks."""
    it = iter(chunks)
    nxt = next(it, None)
    if nxt is None:
        raise ValueError("nothing to prefill: no chunks")
    run = ChunkedPrefill(session, sink_ids=sink_ids, frames_per_chunk=frames_per_chunk, options=options,
                         **overrides)
    while nxt is not None:
        cur, nxt = nxt, next(it, None)
        run.add(cur, last=nxt is None)
        yield run.n_chunks
    return run.finish()


class ChunkedPrefill:
    """The bi-level prefill of one input, fed one chunk at a time (token ids or embeddings [n, n_embd]),
    that can be asked about before it ends: snapshot() is a VideoContext over the chunks added so far
    (their tiers are shared with the prefill, not copied) that stays valid while more chunks are added
    and after finish(). Each call is one operation on the session (its lock), so a live source's
    prefill and questions about it interleave chunk by chunk from any threads.

    options: X2LOptions() (the plain defaults) when None, with any X2LOptions fields in overrides.
    kvzip re-reads every chunk after options.repeat_prompt (None: REPEAT_PROMPT_TEXT for token chunks,
    REPEAT_PROMPT_VIDEO for embedding chunks; decided by the first chunk)."""

    def __init__(self, session, *, sink_ids: Sequence[int], frames_per_chunk: int | None = None,
                 options: X2LOptions | None = None, **overrides):
        self.session = session
        self.options = (options or X2LOptions()).replace(**overrides)
        if self.options.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS} (got {self.options.compressor!r})")
        if self.options.high_compressor not in ("",) + TRAINING_FREE:
            raise ValueError(f"high_compressor must be '' (the compressor's) or one of {TRAINING_FREE} "
                             f"(got {self.options.high_compressor!r})")
        self.sink_ids = [int(t) for t in sink_ids]
        self.frames_per_chunk = frames_per_chunk
        self.n_chunks = 0
        self.finished = False
        self._p = None  # the native prefill, made with the first chunk (kvzip's prompt depends on its kind)

    @staticmethod
    def _is_embd(chunk) -> bool:
        return isinstance(chunk, np.ndarray) and chunk.dtype != np.int32 and chunk.ndim == 2

    def _start(self, first) -> None:
        opts = self.options
        repeat_ids: list[int] = []
        if "kvzip" in (opts.compressor, opts.high_compressor):
            prompt = opts.repeat_prompt
            if prompt is None:
                prompt = REPEAT_PROMPT_VIDEO if self._is_embd(first) else REPEAT_PROMPT_TEXT
            repeat_ids = (self.session.tokenize(prompt, special=False) if isinstance(prompt, str)
                          else [int(t) for t in prompt])
        p = _core.X2LPrefill(self.session._s, **opts.prefill_kwargs(), repeat_prompt=repeat_ids)
        p.add_sink(self.sink_ids)
        self._p = p

    def add(self, chunk, *, last: bool = False) -> None:
        """Prefill one more chunk; last=True for the input's final chunk (with pin_ends it keeps the
        low ratio in the H pass too; no chunk may follow it)."""
        if self.finished:
            raise RuntimeError("this prefill is finished")
        with self.session._lock.op():
            if self._p is None:
                self._start(chunk)
            if self._is_embd(chunk):
                nf = self.frames_per_chunk or 1
                self._p.add_chunk_embd(np.ascontiguousarray(chunk, dtype=np.float32),
                                       n_frames=max(1, min(nf, len(chunk))), is_last=last)
            else:
                ids = [int(t) for t in chunk]
                nf = self.frames_per_chunk or max(1, len(ids) // 64)
                self._p.add_chunk_tokens(ids, n_frames=max(1, min(nf, len(ids))), is_last=last)
        self.n_chunks += 1

    def snapshot(self, **context_kw) -> VideoContext:
        """A VideoContext over the chunks added so far (context_kw as VideoContext's: question_suffix,
        default_top_k, ...). It does not see chunks added later; make a new one for those."""
        if self.finished:
            raise RuntimeError("this prefill is finished: use its index")
        if self._p is None:
            raise ValueError("nothing indexed yet: no chunk has been added")
        with self.session._lock.op():
            index = self._p.snapshot()
        return VideoContext(self.session, index, **context_kw)

    def finish(self):
        """(index, stats): the finished index, and the prefill's figures."""
        if self.finished:
            raise RuntimeError("this prefill is finished")
        if self._p is None:
            raise ValueError("nothing to prefill: no chunks")
        with self.session._lock.op():
            stats = self._p.stats()
            index = self._p.finish()
        self.finished = True
        self._p = None
        return index, stats
