"""OpenAI chat requests -> answer jobs (generators run on the model worker, one step per token).

Content parts: text, image_url (data URL), video_url (file:// in --media-dir, or a data:video/...;base64
upload) and the extension {"type": "video_index", "video_index": {"id": ...}}. A request carries at most
one visual source. Without one, the conversation is rendered with the model's chat template and
generated on the session. With one, the visual input is answered by X²L: images and uploaded/linked
videos are prefilled into a temporary index (images are the frames of a clip), a video_index names a
saved one; the question is the text of the last user message (with the system message as the index's
system prompt for temporary indexes); earlier turns are not part of the question."""
from __future__ import annotations

import os
import time

import numpy as np

from ..generation import generate_ids, stream_text
from ..options import X2LOptions
from ..x2l import VideoContext, split_template
from .indexes import check_id, chunk_ranges, frame_seconds, prefill_job
from .media import SUFFIX, ApiError, decode_data_url, decode_image, resolve_media_path, write_temp


class ChatRequest:
    """A validated /v1/chat/completions body."""

    def __init__(self, body: dict, *, model_id: str, max_tokens_limit: int, media_dir, max_media_bytes: int):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        self.stream = _bool(body, "stream", False)
        so = body.get("stream_options") or {}
        self.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        self.max_tokens = 256 if mt is None else _int(mt, "max_tokens", 1, max_tokens_limit)
        self.temperature = _num(body.get("temperature", 1.0), "temperature", 0.0, 2.0)
        self.top_p = _num(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
        seed = body.get("seed")
        self.seed = int.from_bytes(os.urandom(4), "little") if seed is None else _int(seed, "seed", 0, 2**63 - 1) % 2**32
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        self.stop = [s for s in stop if s]
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        self.model = body.get("model") or model_id
        x = body.get("x2l") or {}
        if not isinstance(x, dict):
            raise ApiError(400, "x2l must be an object", param="x2l")
        self.top_k = None if x.get("top_k") is None else _int(x["top_k"], "x2l.top_k", 0, 1 << 20)
        self.scorer = x.get("scorer")
        scorers = [n for n in X2LOptions.SCORERS if n != "external"]  # "external" needs scores from the caller
        if self.scorer is not None and self.scorer not in scorers:
            raise ApiError(400, "x2l.scorer must be one of " + ", ".join(scorers), param="x2l.scorer")
        self.max_frames = None if x.get("max_frames") is None else _int(x["max_frames"], "x2l.max_frames", 1, 4096)
        self.chunk_frames = None if x.get("chunk_frames") is None else _int(x["chunk_frames"], "x2l.chunk_frames",
                                                                             1, 4096)

        # Messages: text-only copies for the chat template, and the visual source if any.
        self.messages, self.system, self.visual = [], None, None
        self._media_dir, self._max_media_bytes = media_dir, max_media_bytes
        self.images = []
        self.last_seconds = None  # video_index's time window: select among the chunks of the last N seconds
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise ApiError(400, f"messages[{i}] must have a role of system, user or assistant",
                               param=f"messages[{i}]")
            role = "system" if m["role"] == "developer" else m["role"]
            text = self._content(m.get("content"), i, role)
            if role == "system":
                self.system = text if self.system is None else self.system + "\n" + text
            self.messages.append({"role": role, "content": text})
        if self.images:
            self._set_visual(("images", self.images), len(msgs) - 1)
        self.question = next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        if self.visual is not None and not self.question.strip():
            raise ApiError(400, "a question about visual content needs text in the last user message")

    def _set_visual(self, v, i):
        if self.visual is not None:
            raise ApiError(400, "a request may carry only one visual source (images, a video or a video index)",
                           param=f"messages[{i}]")
        self.visual = v

    def _content(self, content, i, role) -> str:
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           param=f"messages[{i}].content")
        texts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ApiError(400, f"{where} must be an object with a type", param=where)
            t = part["type"]
            if t in ("text", "input_text"):
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.text must be a string", param=where)
                texts.append(part["text"])
                continue
            if role != "user":
                raise ApiError(400, f"{where}: visual content is accepted in user messages only", param=where)
            if t == "image_url":
                url = _url(part.get("image_url"), where)
                _, data = decode_data_url(url, kind="image", max_bytes=self._max_media_bytes) \
                    if url.startswith("data:") else _refuse_remote(url, where)
                self.images.append(decode_image(data))
            elif t == "video_url":
                url = _url(part.get("video_url"), where)
                if url.startswith("data:"):
                    mime, data = decode_data_url(url, kind="video", max_bytes=self._max_media_bytes)
                    self._set_visual(("upload", (mime, data)), i)
                elif url.startswith("file:"):
                    self._set_visual(("file", resolve_media_path(url, self._media_dir)), i)
                else:
                    _refuse_remote(url, where)
            elif t == "video_index":
                vi = part.get("video_index")
                idx = vi.get("id") if isinstance(vi, dict) else None
                self._set_visual(("index", check_id(idx)), i)
                last = vi.get("last_seconds")
                if last is not None:
                    self.last_seconds = _num(last, f"{where}.video_index.last_seconds", 1e-3, 1e9)
            else:
                raise ApiError(400, f"{where}: unsupported content part type {t!r}", param=where)
        return "".join(texts)

    def sampling(self) -> dict:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


def _refuse_remote(url, where):
    raise ApiError(400, f"{where}: only data: URLs (and file:// for videos) are accepted, not {url[:40]!r}",
                   param=where)


def _url(obj, where) -> str:
    url = obj.get("url") if isinstance(obj, dict) else obj
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where} needs a url", param=where)
    return url


def _bool(body, key, default):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be a boolean", param=key)
    return v


def _int(v, name, lo, hi) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}]", param=name)
    return v


def _num(v, name, lo, hi) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}]", param=name)
    return float(v)


def _tokens(tok, ids, counter, stop):
    """stream_text over ids, counting the generated tokens in counter[0]."""
    def counted():
        for t in ids:
            counter[0] += 1
            yield t
    return stream_text(tok, counted(), stop)


def answer_steps(server, req: ChatRequest):
    """The answer job: yields text pieces (one step per token); returns the completion's summary."""
    s = server.session
    if req.visual is None:
        prompt = s.chat_prompt(req.messages)
        ids = s.tokenize(prompt, add_bos=False)
        if len(ids) + 1 > s.n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {s.n_ctx}",
                           code="context_length_exceeded")
        counter = [0]
        yield None  # the prompt's prefill is the next step
        gen = s.generate_ids(ids, **req.sampling())
        for piece in _tokens(s._tok, gen, counter, req.stop):
            yield piece
        return _summary(counter[0], len(ids), req, None)

    kind, value = req.visual
    info = None
    allowed = None
    if kind == "index":
        rec, ctx, live = server.indexes.answer_context(value)
        ranges = chunk_ranges(rec.frame_times or [], rec.chunk_frames or 1, ctx.n_chunks, frame_seconds(rec))
        info = {"index": rec.id, "ranges": ranges, "live": live}
        if req.last_seconds is not None:
            end = server.indexes.recorded_end(rec)
            start = round(max(0.0, end - req.last_seconds), 3)
            allowed = [r["chunk"] for r in ranges if r["end_s"] is not None and r["end_s"] > start]
            info["window"] = {"last_seconds": req.last_seconds, "start_s": start, "end_s": end}
            if not allowed:
                done = ranges[-1]["end_s"] if ranges else 0.0
                raise ApiError(409, f"nothing in the last {req.last_seconds:g} s of {rec.id} is indexed yet (indexed "
                                    f"up to {done} s of {end} s recorded)", code="window_not_indexed")
    else:
        ctx, info = yield from _temporary_context(server, req, kind, value)
    yield None
    chunks, scores = _select(ctx, req, allowed)
    ranges = info.get("ranges") or [{"chunk": c, "start_s": None, "end_s": None} for c in range(ctx.n_chunks)]
    info["chunks"] = [dict(ranges[c], score=None if scores is None else round(float(scores[c]), 4)) for c in chunks]
    ctx.reload(chunks)
    q_ids = ctx.question_ids(req.question)
    counter = [0]
    gen = generate_ids(ctx._dec, q_ids, stop_ids=s._stop_ids, **req.sampling())
    yield None
    for piece in _tokens(s._tok, gen, counter, req.stop):
        yield piece
    x2l = {"index": info.get("index"), "n_chunks": ctx.n_chunks, "chunks": info["chunks"],
           "scorer": req.scorer or ctx.default_scorer, "reload": ctx.reload_stats()}
    if "live" in info:
        x2l["live"] = info["live"]  # asked while the source still recorded (on the chunks indexed so far)
    if "window" in info:
        x2l["window"] = info["window"]
    return _summary(counter[0], len(q_ids), req, x2l)


def _select(ctx: VideoContext, req: ChatRequest, allowed=None):
    """(chunks to reload, every chunk's score) for the question; allowed: the chunks it may choose
    from (a time window), None for all."""
    k = ctx.default_top_k if req.top_k is None else req.top_k
    if k == 0:
        return [], None
    scores = ctx.scores(req.question, req.scorer)
    if allowed is None:
        return ctx.select(scores, top_k=min(k, ctx.n_chunks)), scores
    # Chunks outside the window score below every chunk inside it, and k is at most the window's size.
    masked = np.full(len(scores), float(np.min(scores)) - 1.0, dtype=np.float32)
    masked[allowed] = scores[allowed]
    return ctx.select(masked, top_k=min(k, len(allowed))), scores


def _temporary_context(server, req: ChatRequest, kind, value):
    """Prefill images or a video into an index used for this request only (one step per chunk)."""
    s = server.session
    opts = X2LOptions.for_model(s, video=True)
    tmp_path = None
    family = server.media_family
    try:
        if kind == "upload":
            mime, data = value
            tmp_path = write_temp(data, SUFFIX.get(mime, ".bin"), server.tmp_dir)
            video, max_frames, fps = tmp_path, req.max_frames or opts.frames_default, None
        elif kind == "file":
            video, max_frames, fps = value, req.max_frames or opts.frames_default, None
        else:  # images: the frames of one clip
            video, max_frames, fps = value, len(value), None
        if family is not None:
            return (yield from _family_context(server, req, family, video, opts))
        prefix, suffix = split_template(s, req.system)
        cf = req.chunk_frames or opts.chunk_frames
        times, frame_s = _plan_times(video, max_frames, fps)
        chunks = s.video_chunks(video, chunk_frames=cf, max_frames=max_frames, fps=fps)
        index = yield from prefill_job(s, chunks, prefix, cf, opts)
        ctx = VideoContext(s, index, question_suffix=suffix, **opts.question_kwargs())
        ranges = chunk_ranges(times, cf, ctx.n_chunks, frame_s) if times is not None else None
        return ctx, {"index": None, "ranges": ranges}
    finally:
        if tmp_path is not None:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass


def _family_context(server, req: ChatRequest, family, video, opts):
    """A model + mmproj pair: the video prefilled by its family's own pipeline (Session.prefill), with
    the family's sampling unless x2l.max_frames is given (one step: Session.cancel stops it inside)."""
    cf = family.whole_chunk_frames(req.chunk_frames or opts.chunk_frames)
    max_frames, fps = family.default_sampling(video, req.max_frames, None)
    times, frame_s = _plan_times(video, max_frames, fps, family.open_sampled)
    yield None
    ctx = server.session.prefill(video, system=req.system, chunk_frames=cf, max_frames=max_frames, fps=fps,
                                 progress=lambda *a: None)
    return ctx, {"index": None, "ranges": chunk_ranges(times, cf, ctx.n_chunks, frame_s)}


def _plan_times(video, max_frames, fps, opener=None):
    """(times of the frames the sampling reads, seconds per source frame); opener(video, max_frames, fps):
    a media family's open_sampled, else open_video's sampling."""
    if isinstance(video, list):
        return None, 0.0
    from ..video import VideoError, open_video

    try:
        v = opener(video, max_frames, fps) if opener else open_video(video, max_frames=max_frames, fps=fps)
    except (VideoError, ValueError) as e:
        raise ApiError(400, f"cannot read the video: {e}", code="invalid_video") from None
    src_fps = v.fps or 1.0
    idx = [] if v.sample_indices is None else [int(i) for i in v.sample_indices]
    v.close()
    return [i / src_fps for i in idx], 1.0 / src_fps


def _summary(n_completion: int, n_prompt: int, req: ChatRequest, x2l) -> dict:
    finish = "length" if n_completion >= req.max_tokens else "stop"
    return {"finish_reason": finish, "x2l": x2l,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion}}


def completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def now() -> int:
    return int(time.time())
