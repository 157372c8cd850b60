"""The HTTP side: a Starlette app with OpenAI's chat API and video indexes as resources.

Handlers never call the model: they validate, submit a job to the Scheduler and wait for its events
(asyncio queue fed from the worker thread)."""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import shutil
import tempfile
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import BudgetError, Error, FormatError
from ..families import media_module
from ..video import VideoError
from . import chat as C
from .indexes import IndexStore
from .live import LiveSource, camera_number
from .media import SUFFIX, ApiError, decode_data_url, resolve_media_path
from .scheduler import Busy, Cancelled, Job, Scheduler


LIVE_SCHEMES = ("http://", "https://", "rtsp://", "rtsps://", "camera:")


class ServerConfig:
    def __init__(self, *, media_dir=None, index_dir=None, api_key=None, max_host_bytes=0,
                 max_request_bytes=64 << 20, max_upload_bytes=1 << 30, max_queue=64, max_tokens_limit=4096,
                 allow_live=False):
        self.allow_live = bool(allow_live)
        self.media_dir = None if media_dir is None else os.path.realpath(media_dir)
        self.index_dir = index_dir
        self.api_key = api_key
        self.max_host_bytes = int(max_host_bytes)
        self.max_request_bytes = int(max_request_bytes)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_queue = int(max_queue)
        self.max_tokens_limit = int(max_tokens_limit)


class Server:
    """The model, its worker and the index store: one per process."""

    def __init__(self, session, config: ServerConfig):
        self.session = session
        self.config = config
        self.model_id = os.path.basename(session.path)
        self.tmp_dir = tempfile.mkdtemp(prefix="x2l-serve-")
        index_dir = config.index_dir or os.path.join(self.tmp_dir, "indexes")
        self.indexes = IndexStore(session, index_dir, max_host_bytes=config.max_host_bytes)
        # A cancelled request stops the native call running for it (Session.cancel); the request is cleared
        # once its step ends, so the next job is not cancelled by it.
        self.scheduler = Scheduler(max_queue=config.max_queue, cancel_hook=getattr(session, "cancel", None),
                                   clear_hook=getattr(getattr(session, "_s", None), "clear_cancel", None))
        self.started = int(time.time())
        # Read once here: handlers never call into the session (only the worker thread does).
        self.has_vision = session.has_vision
        # x2l_edge.qwen_vl / smolvlm / internvl for a model + mmproj pair (its own prompt layout and X²L
        # prefill), None for the single-file models whose frames go through Session.video_chunks.
        self.media_family = media_module(session)
        self.info = {"vision": self.has_vision, "n_ctx": session.n_ctx, "device": session.device}

    @property
    def family_name(self) -> str:
        return self.media_family.FAMILY_NAME

    @property
    def live_refusal(self) -> str:
        return self.media_family.LIVE_REFUSAL

    def close(self):
        self.scheduler.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _error(e: BaseException) -> JSONResponse:
    if not isinstance(e, ApiError):
        e = _as_api_error(e)
    return JSONResponse(e.body(), status_code=e.status)


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        return ApiError(503, str(e), code="server_busy")
    if isinstance(e, BudgetError):
        return ApiError(413, f"over a memory budget: {e}", code="budget_exceeded")
    if isinstance(e, (VideoError, FormatError, ValueError, TypeError, FileNotFoundError)):
        return ApiError(400, f"{type(e).__name__}: {e}", code="invalid_input")
    if isinstance(e, Error):
        return ApiError(500, f"model error: {e}", code="model_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


class _BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes", code="too_large")


class LimitsAndAuth:
    """ASGI middleware: Bearer auth on /v1/*, and request body limits (413) whether or not the client
    sends Content-Length (uploads to POST /v1/videos get max_upload_bytes, other requests
    max_request_bytes)."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.config.api_key and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
                return await _send_json(send, ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                       code="invalid_api_key"))
        limit = self.config.max_upload_bytes if path == "/v1/videos" else self.config.max_request_bytes
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return await _send_json(send, ApiError(413, f"the request body is larger than {limit} bytes",
                                                   code="too_large"))
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge as e:
            if not started:
                await _send_json(send, e)


async def _send_json(send, e: ApiError):
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _client_key(request: Request) -> str:
    # Fair queuing is per client: the address (all clients share one key behind one API key anyway).
    return request.client.host if request.client else ""


async def _json_body(request: Request) -> dict:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ApiError(400, "the client went away")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def build_app(server: Server) -> Starlette:
    cfg = server.config

    def submit_answer(steps, client) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(q.put_nowait, item)

        job = Job(steps, client=client, emit=lambda x: put(("piece", x)),
                  finish=lambda v: put(("done", v)), fail=lambda e: put(("error", e)))
        server.scheduler.submit(job)
        return job, q

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_id, "object": "model", "created": server.started, "owned_by": "x2l-edge",
             "x2l": server.info}]})

    async def chat_completions(request: Request):
        try:
            body = await _json_body(request)
            req = C.ChatRequest(body, model_id=server.model_id, max_tokens_limit=cfg.max_tokens_limit,
                                media_dir=cfg.media_dir, max_media_bytes=cfg.max_request_bytes)
            if req.visual and not server.has_vision:
                raise ApiError(400, f"the model {server.model_id} has no vision encoder: it takes text only",
                               code="model_not_multimodal")
            if req.visual and req.visual[0] == "images" and server.media_family is not None:
                raise ApiError(501, f"image_url is not supported with {server.family_name} models yet: their "
                                    "X²L path takes videos (send the frames as a video_url)",
                               code="unsupported_for_model")
            if req.visual and req.visual[0] == "index":
                rec = server.indexes.get(req.visual[1])
                recording = rec.status == "indexing" and rec.live
                if rec.status != "ready" and not recording:
                    raise ApiError(400 if rec.status == "failed" else 409, f"video index {rec.id} is {rec.status}"
                                   + (f": {rec.error}" if rec.error else ""), code="index_not_ready")
                if recording and not rec.chunks_done:
                    raise ApiError(409, f"video index {rec.id} is recording but no chunk is indexed yet",
                                   code="index_not_ready")
            job, q = submit_answer(C.answer_steps(server, req), _client_key(request))
        except Exception as e:  # noqa: BLE001
            return _error(e)
        cid, created = C.completion_id(), C.now()
        if req.stream:
            return StreamingResponse(_sse(server, job, q, req, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Non-streamed: collect the pieces, and cancel if the client goes away meanwhile (the body has been
        # read, so the next ASGI message is the disconnect).
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        pieces = []
        try:
            while True:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    server.scheduler.cancel(job)
                    return _error(ApiError(400, "the client went away"))
                kind, value = get.result()
                if kind == "piece":
                    pieces.append(value)
                elif kind == "error":
                    return _error(value)
                else:
                    msg = {"role": "assistant", "content": "".join(pieces)}
                    out = {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                           "choices": [{"index": 0, "message": msg, "finish_reason": value["finish_reason"],
                                        "logprobs": None}],
                           "usage": value["usage"]}
                    if value["x2l"] is not None:
                        out["x2l"] = value["x2l"]
                    return JSONResponse(out)
        except asyncio.CancelledError:
            server.scheduler.cancel(job)
            raise
        finally:
            gone.cancel()

    async def videos_create(request: Request):
        tmp_path = None
        try:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                form = await request.form(max_files=1, max_fields=16)
                up = form.get("file")
                if up is None or isinstance(up, str):
                    raise ApiError(400, "the multipart upload needs a 'file' part", param="file")
                suffix = os.path.splitext(up.filename or "")[1][:8] or SUFFIX.get(up.content_type or "", ".bin")
                fd, tmp_path = tempfile.mkstemp(suffix=suffix, dir=server.tmp_dir)
                with os.fdopen(fd, "wb") as f:
                    while True:
                        block = await up.read(1 << 20)
                        if not block:
                            break
                        f.write(block)
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                source = f"upload:{os.path.basename(up.filename or 'video')}"
                video = tmp_path
            else:
                fields = await _json_body(request)
                if not isinstance(fields, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                url = fields.get("url")
                if not isinstance(url, str) or not url:
                    raise ApiError(400, "give url (file://... inside --media-dir, or data:video/...;base64,...) "
                                        "or a multipart upload", param="url")
                if url.startswith("data:"):
                    mime, data = decode_data_url(url, kind="video", max_bytes=cfg.max_upload_bytes)
                    fd, tmp_path = tempfile.mkstemp(suffix=SUFFIX.get(mime, ".bin"), dir=server.tmp_dir)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    video, source = tmp_path, "upload:data-url"
                elif url.startswith("file:"):
                    video = resolve_media_path(url, cfg.media_dir)
                    source = "file://" + video
                elif url.startswith(LIVE_SCHEMES):
                    if server.media_family is not None:
                        raise ApiError(400, f"live sources are not supported with {server.family_name} models: "
                                            + server.live_refusal, code="unsupported_for_model", param="url")
                    if not cfg.allow_live:
                        raise ApiError(403, "live sources (http(s) MJPEG, rtsp://, camera:N) are disabled: start "
                                            "the server with --allow-live", code="live_disabled", param="url")
                    if url.startswith("camera:"):
                        try:
                            camera_number(url)
                        except ValueError as e:
                            raise ApiError(400, str(e), param="url") from None
                    video, source = None, url
                else:
                    raise ApiError(400, f"unsupported video URL {url[:40]!r} (file://, data:, or with --allow-live "
                                        "http(s)://, rtsp://, camera:N)", param="url")
            opts = _index_fields(fields)
            ready = None
            if video is None:
                max_seconds = fields.get("max_seconds")
                if max_seconds is not None and (isinstance(max_seconds, bool) or
                                                not isinstance(max_seconds, (int, float)) or max_seconds <= 0):
                    raise ApiError(400, "max_seconds must be a positive number", param="max_seconds")
                video = LiveSource(source, fps=opts["fps"], max_frames=opts["max_frames"] or 3600,
                                   max_seconds=max_seconds)
            rec = server.indexes.create(source=source, **opts)
            if isinstance(video, LiveSource):
                live = video.start()
                ready = lambda: server.indexes.live_ready(rec, live)  # noqa: E731
            path_to_clean = tmp_path

            def cleanup():
                if path_to_clean is not None and os.path.exists(path_to_clean):
                    os.unlink(path_to_clean)

            job = Job(server.indexes.index_steps(rec, video, cleanup=cleanup), background=True, ready=ready)
            job.source = video if isinstance(video, LiveSource) else None
            server.indexes.jobs[rec.id] = job
            tmp_path = None  # the job owns it now
            server.scheduler.submit(job)
            return JSONResponse({"id": rec.id, "object": "video.index", "status": rec.status}, status_code=202)
        except ClientDisconnect:
            return _error(ApiError(400, "the client went away"))
        except Exception as e:  # noqa: BLE001
            return _error(e)
        finally:
            if tmp_path is not None and os.path.exists(tmp_path):
                os.unlink(tmp_path)

    async def videos_list(request: Request):
        return JSONResponse({"object": "list", "data": [server.indexes.describe(r) for r in server.indexes.list()]})

    async def videos_get(request: Request):
        try:
            return JSONResponse(server.indexes.describe(server.indexes.get(request.path_params["id"])))
        except Exception as e:  # noqa: BLE001
            return _error(e)

    async def videos_delete(request: Request):
        try:
            rec = server.indexes.get(request.path_params["id"])
            job = server.indexes.jobs.get(rec.id)
            if job is not None:
                server.scheduler.cancel(job)
            server.indexes.delete(rec.id)
            return JSONResponse({"id": rec.id, "object": "video.index.deleted", "deleted": True})
        except Exception as e:  # noqa: BLE001
            return _error(e)

    async def videos_stop(request: Request):
        """End a live source's recording: the index is finished with what it has and becomes answerable."""
        try:
            rec = server.indexes.get(request.path_params["id"])
            job = server.indexes.jobs.get(rec.id)
            src = getattr(job, "source", None)
            if src is None:
                raise ApiError(409, f"video index {rec.id} is not recording a live source", code="not_live")
            src.stop()
            return JSONResponse(server.indexes.describe(rec))
        except Exception as e:  # noqa: BLE001
            return _error(e)

    async def videos_thumbnail(request: Request):
        try:
            chunk = request.path_params["chunk"]
            return Response(server.indexes.thumbnail(request.path_params["id"], chunk), media_type="image/jpeg")
        except Exception as e:  # noqa: BLE001
            return _error(e)

    async def stats(request: Request):
        return JSONResponse({"queued": server.scheduler.queued(), **dict(server.scheduler.stats)})

    async def index_page(request: Request):
        from .page import PAGE

        return HTMLResponse(PAGE)

    routes = [
        Route("/", index_page),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/videos", videos_create, methods=["POST"]),
        Route("/v1/videos", videos_list, methods=["GET"]),
        Route("/v1/videos/{id}", videos_get, methods=["GET"]),
        Route("/v1/videos/{id}", videos_delete, methods=["DELETE"]),
        Route("/v1/videos/{id}/stop", videos_stop, methods=["POST"]),
        Route("/v1/videos/{id}/chunks/{chunk:int}/thumbnail", videos_thumbnail),
        Route("/v1/x2l/stats", stats),
    ]
    app = Starlette(routes=routes)
    app.state.server = server
    return LimitsAndAuth(app, cfg)


def _index_fields(f: dict) -> dict:
    def opt_int(k, lo, hi):
        v = f.get(k)
        if v is None or v == "":
            return None
        try:
            v = int(v)
        except (TypeError, ValueError):
            raise ApiError(400, f"{k} must be an integer", param=k) from None
        if not lo <= v <= hi:
            raise ApiError(400, f"{k} must be in [{lo}, {hi}]", param=k)
        return v

    fps = f.get("fps")
    if fps not in (None, ""):
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            raise ApiError(400, "fps must be a number", param="fps") from None
        if not 0 < fps <= 120:
            raise ApiError(400, "fps must be in (0, 120]", param="fps")
    else:
        fps = None
    system = f.get("system")
    if system is not None and not isinstance(system, str):
        raise ApiError(400, "system must be a string", param="system")
    return dict(system=system or None, chunk_frames=opt_int("chunk_frames", 1, 1024),
                max_frames=opt_int("max_frames", 1, 100000), fps=fps)


async def _sse(server, job, q, req, cid, created):
    def chunk(delta, finish=None, **extra):
        d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(d)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await q.get()
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "error":
                e = _as_api_error(value) if not isinstance(value, Cancelled) else ApiError(400, "cancelled")
                yield f"data: {json.dumps(e.body())}\n\n"
                break
            else:
                extra = {"x2l": value["x2l"]} if value["x2l"] is not None else {}
                yield chunk({}, value["finish_reason"], **extra)
                if req.include_usage:
                    yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': req.model, 'choices': [], 'usage': value['usage']})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the stream ends or the client disconnects (the generator is closed/cancelled).
        server.scheduler.cancel(job)
