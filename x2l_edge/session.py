"""The friendly Python API: Session(path).generate / chat / tokenize / detokenize."""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Iterator, Sequence

from . import _core
from . import chat as _chat
from . import checks
from . import device as _device
from .concurrency import CancelToken, OperationLock
from .families import QWEN_PROJECTORS, media_module
from .concurrency import CancelledError as x2l_edge_cancelled
from .generation import SAMPLING, generate_ids, stream_text
from .options import X2LOptions
from .progress import scope as _progress_scope
from .x2l import VideoContext, prefill_chunks, split_template


class Session:
    """A loaded model with its context.

    >>> s = Session(x2l_edge.models.smollm2_path())
    >>> s.chat("What is the capital of France?")

    device: 'cpu', 'cuda:N' (on that GPU: the LLM forward of eval/generate/chat with an f16 KV cache in
    device memory, the vision tower, the forward passes and attention votes of the X²L bi-level prefill
    (both compressors), the scorers' question pass, and the X²L decoder's mixed cache with the L-KV
    reload; entry selection and the scoring arithmetic stay on the host; not yet validated on a GPU,
    see issue 5) or 'auto' (the default): cuda:0 when this build has the CUDA backend, a device is
    present, the model fits it and its logits on a short probe agree with the CPU backend's; the CPU
    backend otherwise. A device that cannot be used at run time falls back to the CPU backend with a
    one-line RuntimeWarning (not in a build without CUDA, where 'auto' is simply the CPU).

    cuda_graphs: on a device, each generated token replays one captured CUDA graph instead of
    launching every kernel (see graph_stats()); False launches them one by one.

    Threads: a Session may be shared. Its operations (and those of its VideoContexts) run one at a
    time; a stream (stream=True) holds the session until it is exhausted or closed. Different Sessions
    run in parallel. cancel() (or a CancelToken passed as cancel=) stops a running operation with
    CancelledError within about one layer's work; the session stays usable (x2l_edge/concurrency.py).
    """

    def __init__(self, model_path: str | os.PathLike, *, mmproj: str | os.PathLike | None = None, n_threads: int = 0,
                 n_ctx: int = 0, kv_type: str = "f16", n_batch: int = 256, device: str = "auto",
                 cuda_graphs: bool = True):
        path = checks.input_file(model_path, "model file")
        # mmproj: llama.cpp's vision file (mmproj.gguf) next to a model.gguf without a vision tower.
        self.mmproj = None if mmproj is None else checks.input_file(mmproj, "mmproj file")
        cores = os.cpu_count() or 1
        n_threads = checks.integer("n_threads", n_threads, lo=0, hi=max(64, 4 * cores))
        if n_threads > cores:
            warnings.warn(f"x2l-edge: n_threads={n_threads} is more than the {cores} cores of this machine "
                          "(slower, not faster)", RuntimeWarning, stacklevel=2)
        n_ctx = checks.integer("n_ctx", n_ctx, lo=0)
        n_batch = checks.integer("n_batch", n_batch, lo=1, hi=2**31 - 1)
        if not isinstance(kv_type, str):
            raise TypeError(f"kv_type must be a str (got {type(kv_type).__name__})")
        kw = dict(n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, cuda_graphs=bool(cuda_graphs))
        self._s, device = _device.open_llm(path, device, **kw)
        self._lock = OperationLock(self._s)
        self._tok = self._s.tokenizer
        self.path = path
        # Where eval/generate/chat, the vision tower, the X²L prefill's forward passes and the X²L
        # decoder run (each falls back to the CPU with a RuntimeWarning when it cannot use the device).
        self.device = device
        self.chat_template = self._s.metadata("tokenizer.chat_template")
        info = self._s.info()
        self._n_vocab = info["n_vocab"]
        n_train = info["n_ctx_train"]
        if n_ctx > n_train:
            warnings.warn(f"x2l-edge: n_ctx={n_ctx} is beyond the model's training context ({n_train} tokens): "
                          "positions past it give poor answers", RuntimeWarning, stacklevel=2)
        self._stop_ids = {i for i in (self._tok.eos_id, self._tok.eot_id) if i is not None and i >= 0}
        for end in (b"<|im_end|>", b"<end_of_utterance>"):  # ChatML's turn end; SmolVLM2 / Idefics3's
            ids = self._tok.encode(end.decode(), parse_special=True)
            if len(ids) == 1 and self._tok.token_bytes(ids[0]) == end:
                self._stop_ids.add(ids[0])
        if self.mmproj is not None:
            from .families import check_pair

            check_pair(self)

    # ------------------------------------------------------------------ info
    @property
    def info(self) -> dict:
        return self._s.info()

    def memory(self) -> dict:
        """Bytes used: weights (mapped), KV cache, scratch workspace."""
        return self._s.memory()

    def graph_stats(self) -> dict:
        """The device decode's CUDA graph use: captures, replays, and a note saying why graphs were
        turned off if the driver refused a capture (all zeros on the CPU backend)."""
        return self._s.graph_stats()

    @property
    def n_ctx(self) -> int:
        return self._s.n_ctx

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        return list(self._tok.encode(text, parse_special=special, add_bos=add_bos))

    def detokenize(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._tok.decode(self._token_ids(ids), skip_special=skip_special).decode("utf-8", errors="replace")

    def _token_ids(self, ids) -> list[int]:
        """Token ids checked: ints (TypeError otherwise) in [0, n_vocab) (ValueError otherwise)."""
        return checks.integers("token ids", ids, lo=0, hi=self._n_vocab - 1)

    # ------------------------------------------------------------------ low level
    def eval(self, ids: Sequence[int], *, all_logits: bool = False, cancel: CancelToken | None = None):
        """Append tokens to the context (reusing nothing). Returns [n, n_vocab] logits if all_logits."""
        ids = self._token_ids(ids)
        with self._lock.op(cancel):
            return self._s.eval(ids, all_logits=all_logits)

    def logits(self):
        with self._lock.op():
            return self._s.logits()

    def reset(self) -> None:
        with self._lock.op():
            self._s.truncate(0)

    def exclusive(self, cancel: CancelToken | None = None):
        """A with block that holds the session for several calls (e.g. reset() then eval()), so no
        other thread's operation runs in between."""
        return self._lock.op(cancel)

    def cancel(self) -> None:
        """Stop the operation running on this session now, from any thread: it raises CancelledError
        (within about one layer's work on the CPU). Later operations are not affected."""
        self._lock.cancel()

    def generate_ids(self, prompt_ids: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                     repeat_last_n: int = 64, seed: int = 0, stop_ids: Iterable[int] | None = None,
                     cancel: CancelToken | None = None) -> Iterator[int]:
        """Yield generated token ids (stop tokens excluded), reusing the cached common prefix.

        The low-level token loop: it does NOT hold the session (each native call is still serialized), so
        a caller that interleaves it with other work in one thread (the server's scheduler) can; threads
        that share the session use generate(..., stream=True), which holds it. cancel: checked now only."""
        if cancel is not None and cancel.cancelled:
            raise x2l_edge_cancelled("cancelled before it started")
        return self._generate_ids(prompt_ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                  repeat_last_n=repeat_last_n, seed=seed, stop_ids=stop_ids)

    def _generate_ids(self, prompt_ids, *, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                      repeat_last_n, seed, stop_ids):
        return generate_ids(self._s, prompt_ids, stop_ids=self._stop_ids if stop_ids is None else stop_ids,
                             max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)

    def _stream(self, prompt_ids, stop: Sequence[str], gen) -> Iterator[str]:
        return stream_text(self._tok, self._generate_ids(prompt_ids, stop_ids=None, **gen), stop)

    # ------------------------------------------------------------------ text API
    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int = 0, stop: Sequence[str] | str = (),
                 stream: bool = False, add_bos: bool | None = None, cancel: CancelToken | None = None):
        """Complete a raw prompt. Returns the text, or an iterator of text pieces with stream=True (it
        holds the session until it ends or is closed). cancel: a CancelToken that stops this call."""
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if s]
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_bos=self._tok_adds_bos() if add_bos is None else add_bos)
        elif prompt is None or isinstance(prompt, bytes) or not hasattr(prompt, "__iter__"):
            raise TypeError(f"prompt must be a str or a sequence of token ids (got {type(prompt).__name__})")
        else:
            ids = self._token_ids(prompt)
        gen = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        if stream:
            return self._lock.stream(lambda: self._stream(ids, stop, gen), cancel)
        with self._lock.op(cancel):
            return "".join(self._stream(ids, stop, gen))

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
                     progress=None, cancel: CancelToken | None = None, **x2l_options):
        """Index a long text with bi-level KV compression (the same path video takes): the text is cut into
        chunks of chunk_tokens tokens; returns a VideoContext to ask questions on.

        progress: None (a bar on a terminal), False, True or progress(step, done, total) (x2l_edge/progress.py).
        x2l_options: any X2LOptions field (x2l_edge/options.py lists them with their defaults); the
        model's GGUF x2l.* values are not used for text."""
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty str")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError("chunk_tokens must be a positive int")
        opts = X2LOptions.for_model(self, video=False, **x2l_options)
        prefix, suffix = split_template(self, system)
        ids = self.tokenize(text, special=False)
        chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
        with self._lock.op(cancel), _progress_scope(progress) as prog:
            index, stats = prefill_chunks(self, chunks, sink_ids=self.tokenize(prefix), n_chunks=len(chunks),
                                          progress=prog, options=opts)
        ctx = VideoContext(self, index, question_prefix="\n", question_suffix=suffix, **opts.question_kwargs())
        ctx.prefill_stats = stats
        return ctx

    # ------------------------------------------------------------------ video
    @property
    def has_vision(self) -> bool:
        if self.mmproj is not None:
            return bool(self._vision_meta("clip.has_vision_encoder", False))
        return bool(self._s.metadata("clip.has_vision_encoder"))

    @property
    def vision_path(self) -> str:
        """The file holding the vision tower: the mmproj when one was given, else the model file."""
        return self.mmproj or self.path

    def _vision_meta(self, key, default=None):
        if not hasattr(self, "_vgguf"):
            self._vgguf = _core.GGUFFile.open(self.vision_path)
        v = self._vgguf.get(key)
        return default if v is None else v

    @property
    def is_qwen_vl(self) -> bool:
        """A Qwen2-VL / Qwen2.5-VL model (M-RoPE LLM + Qwen merger): images and videos go through
        x2l_edge.qwen_vl."""
        return self.has_vision and self._vision_meta("clip.projector_type", "") in QWEN_PROJECTORS

    def _video_question_kwargs(self, system: str | None = None) -> dict | None:
        """How a question continues after a video index with an M-RoPE text position: the model's media module
        lays it out (Qwen2-VL); None when this model has no such layout (VideoContext.load then refuses)."""
        return media_module(self).context_kwargs(self, system) if self.is_qwen_vl else None

    def _meta(self, key, default=None):
        if not hasattr(self, "_gguf"):
            self._gguf = _core.GGUFFile.open(self.path)
        v = self._gguf.get(key)
        return default if v is None else v

    @property
    def vision(self):
        """The C++ vision tower + projector + pooling (loaded on first use), on the session's device."""
        if not hasattr(self, "_vision"):
            if not self.has_vision:
                raise ValueError(f"{self.path} has no vision encoder (a text-only model)")
            with self._lock.op():
                if not hasattr(self, "_vision"):
                    tower = _core.QwenVision if self.is_qwen_vl else _core.VisionEncoder
                    self._vision = _device.open_vision(self.vision_path, self.device, self._s.n_threads, tower)
        return self._vision

    @property
    def preprocessor(self):
        if not hasattr(self, "_pre"):
            from .video import VideoPreprocessor

            if self._vision_meta("x2l.vision.kind") is not None:  # a tools/convert.py file
                self._pre = VideoPreprocessor.from_gguf_metadata(self._vision_meta)
            else:  # llama.cpp's LLaVA mmproj (or merged pair) has no x2l.image.* keys: the tower says how to resize
                c = self.vision.config
                self._pre = VideoPreprocessor(c["image_size"], tuple(c["image_mean"]), tuple(c["image_std"]),
                                              c["resize"], c["resample"])
        return self._pre

    def encode_frames(self, pixels, *, cancel: CancelToken | None = None) -> "np.ndarray":
        """Preprocessed frames float32 [F, 3, S, S] -> LLM input embeddings [F * tokens_per_frame, n_embd].
        cancel() (or cancel=token) stops it between the tower's layers with CancelledError."""
        import numpy as np

        enc = self.vision
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        with self._lock.op(cancel):
            return enc.encode(pixels, session=self._s)

    def video_chunks(self, video, *, chunk_frames: int | None = None, max_frames: int | None = None,
                     fps: float | None = None, progress=None, allow_convert: bool = False):
        """Decode, preprocess and encode a video chunk by chunk: yields embeddings [n_tokens, n_embd] of
        chunk_frames frames each (the model's trailing newline is appended to the last chunk). Frames are
        streamed: only one chunk's frames are held at a time. progress: as in prefill (steps 'decode' and
        'encode')."""
        vid, chunk_frames = self._open_video(video, chunk_frames, max_frames, fps, allow_convert)
        with _progress_scope(progress) as prog:
            yield from self._stream_chunks(video, vid, chunk_frames, prog, allow_convert)

    def _open_video(self, video, chunk_frames, max_frames, fps, allow_convert):
        from .video import open_video

        if self.is_qwen_vl:
            raise NotImplementedError("Qwen2-VL / Qwen2.5-VL videos are encoded per temporal pair at their M-RoPE "
                                      "positions: use prefill() / ask() (x2l_edge.qwen_vl)")
        family = media_module(self)
        if family is not None:
            raise NotImplementedError(f"{family.FAMILY_NAME} frames are interleaved with their own prompt text: use "
                                      f"prefill() / ask() ({family.__name__})")
        self.vision  # a text-only model is refused before the video is looked at

        defaults = X2LOptions.for_model(self, video=True)
        chunk_frames = int(chunk_frames or defaults.chunk_frames)
        if chunk_frames < 1:
            raise ValueError("chunk_frames must be >= 1")
        if max_frames is None and fps is None:
            max_frames = defaults.frames_default
        return open_video(video, max_frames=max_frames, fps=fps, allow_convert=allow_convert), chunk_frames

    @staticmethod
    def _n_chunks(vid, chunk_frames):
        return None if vid.n_samples is None else -(-vid.n_samples // chunk_frames)

    def _stream_chunks(self, video, vid, chunk_frames, progress, allow_convert):
        import numpy as np

        enc = self.vision
        pre = self.preprocessor
        newline = enc.image_newline if self._meta("x2l.video.newline", "none") == "end" else None
        buf = []
        pending = None  # hold one chunk back so the newline can go after the last frame
        n_encoded = 0

        def flush():
            nonlocal n_encoded
            embd = self.encode_frames(pre.batch(buf, allow_convert=allow_convert))
            n_encoded += len(buf)
            progress.update("encode", n_encoded, vid.n_samples)
            return embd

        n_frames = 0
        for frame in vid.frames():
            buf.append(frame.rgb)
            n_frames += 1
            progress.update("decode", n_frames, vid.n_samples)
            if len(buf) == chunk_frames:
                if pending is not None:
                    yield pending
                pending = flush()
                buf = []
        if buf:
            if pending is not None:
                yield pending
            pending = flush()
        if pending is None:
            from .video import VideoError

            raise VideoError(f"no frames could be read from {video!r}")
        if newline is not None:
            pending = np.concatenate([pending, np.asarray(newline, dtype=np.float32)[None, :]], axis=0)
        yield pending

    def prefill(self, video, *, system: str | None = None, chunk_frames: int | None = None,
                max_frames: int | None = None, fps: float | None = None, progress=None,
                cancel: CancelToken | None = None, **x2l_options):
        """Index a video with bi-level KV compression: frames are decoded, encoded and prefilled chunk by
        chunk (bounded memory); returns a VideoContext for any number of questions.

        progress: None (the default: a bar per step on stderr when it is a terminal), False (quiet), True
        (bars), or a callable progress(step, done, total) with step 'decode', 'encode' (frames) and 'index'
        (chunks) (x2l_edge/progress.py).
        x2l_options: any X2LOptions field; the defaults are the model's (X2LOptions.for_model)."""
        family = media_module(self)  # Qwen: chunks keep their M-RoPE positions; SmolVLM2: timestamped frames
        if family is not None:
            with self._lock.op(cancel):
                return family.prefill_video(self, video, system=system, chunk_frames=chunk_frames,
                                            max_frames=max_frames, fps=fps, progress=progress, **x2l_options)
        opts = X2LOptions.for_model(self, video=True, **x2l_options)
        prefix, suffix = split_template(self, system)
        chunk_frames = int(chunk_frames or opts.chunk_frames)
        vid, chunk_frames = self._open_video(video, chunk_frames, max_frames, fps, False)
        with self._lock.op(cancel), _progress_scope(progress) as prog:
            chunks = self._stream_chunks(video, vid, chunk_frames, prog, False)
            index, stats = prefill_chunks(self, chunks, sink_ids=self.tokenize(prefix),
                                          frames_per_chunk=chunk_frames, options=opts, progress=prog,
                                          n_chunks=self._n_chunks(vid, chunk_frames))
        ctx = VideoContext(self, index, question_prefix="\n", question_suffix=suffix, **opts.question_kwargs())
        ctx.prefill_stats = stats
        return ctx

    def ask(self, video, question: str, *, mode: str = "x2l", system: str | None = None, top_k: int | None = None,
            scorer: str | None = None, max_frames: int | None = None, fps: float | None = None,
            chunk_frames: int | None = None, max_tokens: int = 64, progress=None, stream: bool = False,
            cancel: CancelToken | None = None, **options):
        """Answer a question about a video. mode='x2l' (bi-level compression + selective reload) or
        'full' (uncompressed KV baseline: every visual token in the cache)."""
        if mode == "full":
            family = media_module(self)
            if family is not None:
                def run():
                    return family.ask_full(self, video, question, system=system, max_frames=max_frames, fps=fps,
                                           chunk_frames=chunk_frames, max_tokens=max_tokens, progress=progress,
                                           stream=True, **options)
            else:
                def run():
                    return self._ask_full(video, question, system=system, max_frames=max_frames, fps=fps,
                                          chunk_frames=chunk_frames, max_tokens=max_tokens, progress=progress,
                                          **options)
            if stream:
                return self._lock.stream(run, cancel)
            with self._lock.op(cancel):
                return "".join(run())
        if mode != "x2l":
            raise ValueError("mode must be 'x2l' or 'full'")
        sampling = {k: options.pop(k) for k in list(options) if k in SAMPLING}
        ctx = self.prefill(video, system=system, chunk_frames=chunk_frames, max_frames=max_frames, fps=fps,
                           progress=progress, cancel=cancel, **options)
        return ctx.ask(question, top_k=top_k, scorer=scorer, max_tokens=max_tokens, stream=stream, cancel=cancel,
                       **sampling)

    def _ask_full(self, video, question, *, system, max_frames, fps, chunk_frames, max_tokens, progress,
                  **sampling):
        prefix, suffix = split_template(self, system)
        self.reset()
        self._s.eval(self.tokenize(prefix))
        vid, chunk_frames = self._open_video(video, chunk_frames, max_frames, fps, False)
        with _progress_scope(progress) as prog:
            for done, embd in enumerate(self._stream_chunks(video, vid, chunk_frames, prog, False), 1):
                self._s.eval_embd(embd)
                prog.update("prefill", done, self._n_chunks(vid, chunk_frames))
        ids = list(self._s.history) + self.tokenize("\n" + question + suffix)
        gen = generate_ids(self._s, ids, stop_ids=self._stop_ids, max_tokens=max_tokens, **sampling)
        return stream_text(self._tok, gen, [])

    def _tok_adds_bos(self) -> bool:
        return bool(self._s.metadata("tokenizer.ggml.add_bos_token") or False)
