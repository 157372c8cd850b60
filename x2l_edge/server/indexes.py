"""Video indexes as resources: built in the background, saved under --index-dir (index format 5 +
a small JSON record), found again after a restart, loaded on first use and kept under a host-memory
budget (the least recently used beyond --max-host-bytes keep their L tier memory-mapped).

Everything that touches the model (prefill, load, question) runs on the scheduler's worker thread;
the registry's records are read by the HTTP handlers under a lock."""
from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import threading
import time

from ..families import media_module
from ..options import X2LOptions
from ..x2l import ChunkedPrefill, VideoContext, split_template
from ..video import VideoError
from .live import LiveSource
from .media import ApiError

ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def new_id() -> str:
    return "vid-" + secrets.token_hex(8)


def check_id(index_id) -> str:
    if not isinstance(index_id, str) or not index_id.startswith("vid-") or not set(index_id) <= ID_CHARS \
            or len(index_id) > 64:
        raise ApiError(404, f"no video index {index_id!r}", code="index_not_found")
    return index_id


def chunk_ranges(times: list[float], chunk_frames: int, n_chunks: int, frame_s: float) -> list[dict]:
    """Time range of each chunk: from its first frame's timestamp to its last frame's plus one frame."""
    out = []
    for c in range(n_chunks):
        ts = times[c * chunk_frames:(c + 1) * chunk_frames]
        if not ts:
            out.append({"chunk": c, "start_s": None, "end_s": None})
            continue
        out.append({"chunk": c, "start_s": round(ts[0], 3), "end_s": round(ts[-1] + frame_s, 3)})
    return out


def prefill_job(session, chunks, prefix: str, chunk_frames: int, opts, rec=None, run=None):
    """The bi-level prefill as job steps: yields None after each chunk (counted in rec.chunks_done),
    returns the index. run: the ChunkedPrefill to feed (one that others may snapshot meanwhile)."""
    run = run or ChunkedPrefill(session, sink_ids=session.tokenize(prefix), frames_per_chunk=chunk_frames,
                                options=opts)
    it = iter(chunks)
    nxt = next(it, None)
    if nxt is None:
        raise ValueError("nothing to prefill: no chunks")
    # One chunk of look-ahead: the last chunk is prefilled knowing it is the last.
    while nxt is not None:
        cur, nxt = nxt, next(it, None)
        run.add(cur, last=nxt is None)
        if rec is not None:
            rec.chunks_done = run.n_chunks
        yield None
    return run.finish()[0]


def frame_seconds(rec) -> float:
    """Seconds per sampled frame: the record's, or (a live source still recording without a fixed rate)
    the mean spacing of the arrival times so far."""
    if rec.frame_s:
        return rec.frame_s
    times = rec.frame_times or []
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0


class LiveState:
    """A live index while it records: its prefill, and the snapshot questions are answered on (made
    again when more chunks are in)."""

    def __init__(self, run, source):
        self.run = run
        self.source = source
        self.ctx = None


class IndexRecord:
    """What the server knows about one index (the JSON next to its .x2l file)."""

    FIELDS = ("id", "status", "source", "created", "system", "chunk_frames", "max_frames", "fps", "n_frames",
              "duration_s", "frame_times", "frame_s", "chunks_done", "chunks_total", "bytes", "error",
              "index_seconds", "live", "note", "memory_only")

    def __init__(self, **kw):
        for f in self.FIELDS:
            setattr(self, f, kw.get(f))

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


class IndexStore:
    def __init__(self, session, index_dir: str, *, max_host_bytes: int = 0):
        self.session = session
        self.dir = index_dir
        os.makedirs(index_dir, exist_ok=True)
        self.max_host_bytes = int(max_host_bytes)
        self._lock = threading.Lock()
        self.records: dict[str, IndexRecord] = {}
        self.jobs: dict[str, object] = {}                 # id -> the indexing Job while it runs
        self.live: dict[str, LiveState] = {}              # id -> a live index's state while it records
        self._loaded: collections.OrderedDict = collections.OrderedDict()  # id -> VideoContext, LRU first
        self._scan()

    # ------------------------------------------------------------------ files
    def _paths(self, index_id: str) -> tuple[str, str]:
        return os.path.join(self.dir, index_id + ".x2l"), os.path.join(self.dir, index_id + ".json")

    def _write_record(self, rec: IndexRecord) -> None:
        _, meta = self._paths(rec.id)
        tmp = meta + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec.to_json(), f)
        os.replace(tmp, meta)

    def _scan(self) -> None:
        """Register the indexes saved by an earlier run; one interrupted while indexing is marked failed."""
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json") or not name.startswith("vid-"):
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    rec = IndexRecord(**json.load(f))
                check_id(rec.id)
            except (OSError, ValueError, TypeError, ApiError):
                continue
            if rec.status == "ready" and rec.memory_only:
                rec.status, rec.error = "failed", "the index was kept in memory only (not saved) and is gone after " \
                                                  "the server's restart"
                self._write_record(rec)
            elif rec.status != "ready":
                rec.status, rec.error = "failed", rec.error or "indexing was interrupted by a server restart"
                self._write_record(rec)
            elif not os.path.exists(self._paths(rec.id)[0]):
                rec.status, rec.error = "failed", "the index file is missing"
            self.records[rec.id] = rec

    # ------------------------------------------------------------------ records
    def get(self, index_id: str) -> IndexRecord:
        check_id(index_id)
        with self._lock:
            rec = self.records.get(index_id)
        if rec is None:
            raise ApiError(404, f"no video index {index_id!r}", code="index_not_found")
        return rec

    def describe(self, rec: IndexRecord) -> dict:
        with self._lock:
            ctx = self._loaded.get(rec.id)
            mapped = None if ctx is None else bool(ctx.n_chunks and ctx.chunk_info(0)["low_mapped"])
        d = {"id": rec.id, "object": "video.index", "status": rec.status, "created": rec.created,
             "source": rec.source, "progress": {"chunks_done": rec.chunks_done or 0, "chunks_total": rec.chunks_total},
             "duration_s": rec.duration_s, "n_frames": rec.n_frames, "chunk_frames": rec.chunk_frames,
             "bytes": rec.bytes, "error": rec.error, "index_seconds": rec.index_seconds,
             "residency": "not_loaded" if ctx is None else ("mmap" if mapped else "resident"),
             "live": bool(rec.live), "note": rec.note, "saved": not rec.memory_only}
        with self._lock:
            live = self.live.get(rec.id)
        if live is not None:
            d["recorded_s"] = self.recorded_end(rec)
        if rec.status == "ready" or live is not None:
            n = (rec.bytes or {}).get("n_chunks") or rec.chunks_done or 0
            d["chunks"] = chunk_ranges(rec.frame_times or [], rec.chunk_frames or 1, n, frame_seconds(rec))
            thumbs = self._thumb_dir(rec.id)
            for c in d["chunks"]:
                if os.path.exists(os.path.join(thumbs, f"{c['chunk']}.jpg")):
                    c["thumbnail"] = f"/v1/videos/{rec.id}/chunks/{c['chunk']}/thumbnail"
        return d

    def list(self) -> list[IndexRecord]:
        with self._lock:
            return sorted(self.records.values(), key=lambda r: r.created or 0)

    def create(self, *, source: str, system: str | None, chunk_frames: int | None, max_frames: int | None,
               fps: float | None) -> IndexRecord:
        rec = IndexRecord(id=new_id(), status="queued", source=source, created=int(time.time()), system=system,
                          chunk_frames=chunk_frames, max_frames=max_frames, fps=fps, chunks_done=0)
        with self._lock:
            self.records[rec.id] = rec
        self._write_record(rec)
        return rec

    def delete(self, index_id: str) -> None:
        rec = self.get(index_id)
        with self._lock:
            self.records.pop(rec.id, None)
            self._loaded.pop(rec.id, None)
            self.live.pop(rec.id, None)
            job = self.jobs.pop(rec.id, None)
        if job is not None:
            job.cancel()
        for p in self._paths(rec.id):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        shutil.rmtree(self._thumb_dir(rec.id), ignore_errors=True)

    # ------------------------------------------------------------------ indexing (worker thread)
    def index_steps(self, rec: IndexRecord, video, *, cleanup=None):
        """Generator (one step per chunk) that builds, saves and registers an index from a video
        source (a path in the media dir or a temporary upload)."""
        from ..video import open_video

        s = self.session
        t0 = time.perf_counter()
        try:
            rec.status = "indexing"
            opts = X2LOptions.for_model(s, video=True)
            cf = int(rec.chunk_frames or opts.chunk_frames)
            family = media_module(s)
            if family is not None:
                if isinstance(video, LiveSource):
                    raise ValueError("live sources are not supported for model + mmproj pairs")
                return (yield from self._family_steps(rec, video, family, opts, cf, t0))
            if isinstance(video, LiveSource):
                return (yield from self._live_steps(rec, video, opts, cf, t0))
            max_frames = rec.max_frames if (rec.max_frames or rec.fps) else opts.frames_default
            # The sampling plan (which frames, their timestamps) is known before decoding.
            v = open_video(video, max_frames=max_frames, fps=rec.fps)
            idx = [int(i) for i in (v.sample_indices if v.sample_indices is not None else [])]
            src_fps = v.fps or 1.0
            rec.chunk_frames, rec.max_frames = cf, max_frames
            rec.frame_times = [round(i / src_fps, 3) for i in idx]
            rec.frame_s = 1.0 / src_fps
            rec.n_frames = len(idx)
            rec.duration_s = v.duration_s
            rec.chunks_total = -(-len(idx) // cf) if idx else None
            yield None
            prefix, _ = split_template(s, rec.system)
            if v.fps:
                # Decode here (the same sampled frames) to keep each chunk's first frame as its thumbnail;
                # the frames carry their timestamps, and a rate no two frames share passes them all on.
                def frames():
                    for k, fr in enumerate(v.frames()):
                        if k % cf == 0:
                            self._save_thumbnail(rec.id, k // cf, fr.rgb)
                        yield fr
                chunks = s.video_chunks(frames(), chunk_frames=cf, fps=1e6)
            else:
                v.close()
                chunks = s.video_chunks(video, chunk_frames=cf, max_frames=max_frames, fps=rec.fps)
            try:
                index = yield from prefill_job(s, chunks, prefix, cf, opts, rec)
            finally:
                v.close()
            return self._register(rec, index, opts, t0)
        except GeneratorExit:
            raise
        except BaseException as e:
            self._failed(rec, e)
            raise
        finally:
            with self._lock:
                self.jobs.pop(rec.id, None)
            if cleanup is not None:
                cleanup()

    def _family_steps(self, rec: IndexRecord, video, family, opts, cf: int, t0: float):
        """Index a video with a media family's own prefill (Session.prefill dispatches to it): the same
        frames, prompt layout and chunks as Session.prefill / Session.ask give for these settings. One
        step: Session.cancel stops it inside."""
        s = self.session
        cf = family.whole_chunk_frames(cf)
        max_frames, fps = family.default_sampling(video, rec.max_frames, rec.fps)
        v = family.open_sampled(video, max_frames, fps)  # the frames Session.prefill will read
        idx = [int(i) for i in (v.sample_indices if v.sample_indices is not None else [])]
        src_fps = v.fps or 1.0
        rec.duration_s = v.duration_s
        v.close()
        rec.chunk_frames, rec.max_frames, rec.fps = cf, max_frames, fps
        rec.frame_times = [round(i / src_fps, 3) for i in idx]
        rec.frame_s = 1.0 / src_fps
        rec.n_frames = len(idx)
        rec.chunks_total = -(-len(idx) // cf) if idx else None
        yield None

        def progress(*args):  # (done, total) frames read, or (step, done, total)
            if len(args) == 3 and args[0] == "index":
                rec.chunks_done = args[1]
        ctx = s.prefill(video, system=rec.system, chunk_frames=cf, max_frames=max_frames, fps=fps, progress=progress)
        return self._register(rec, None, opts, t0, ctx=ctx)

    def _live_steps(self, rec: IndexRecord, src, opts, cf: int, t0: float):
        """Index a live source chunk by chunk while it records; the job's ready() lets the worker wait
        for a chunk of frames without blocking (see live_ready)."""
        s = self.session
        rec.chunk_frames, rec.frame_times, rec.live = cf, [], True
        rec.frame_s = 1.0 / src.fps if src.fps else None

        def recorded():
            for fr in src.frames():
                if len(rec.frame_times) % cf == 0:
                    self._save_thumbnail(rec.id, len(rec.frame_times) // cf, fr.rgb)
                rec.frame_times.append(round(fr.timestamp_s, 3))
                rec.n_frames = len(rec.frame_times)
                yield fr
            if not rec.frame_times:
                raise VideoError(f"no frames from {src.url}: {src.end_reason}")

        prefix, _ = split_template(s, rec.system)
        # The source has selected its frames already: a rate no two frames share passes them all through.
        chunks = s.video_chunks(recorded(), chunk_frames=cf, fps=1e6)
        # Questions while it records are answered on snapshots of this prefill (answer_context).
        run = ChunkedPrefill(s, sink_ids=s.tokenize(prefix), frames_per_chunk=cf, options=opts)
        with self._lock:
            self.live[rec.id] = LiveState(run, src)
        try:
            index = yield from prefill_job(s, chunks, prefix, cf, opts, rec, run=run)
        finally:
            src.stop()
            with self._lock:
                self.live.pop(rec.id, None)
        times = rec.frame_times
        if rec.frame_s is None:
            rec.frame_s = round((times[-1] - times[0]) / (len(times) - 1), 3) if len(times) > 1 else 0.0
        rec.duration_s = round(times[-1] + rec.frame_s, 3) if times else 0.0
        rec.note = f"{src.end_reason}; {src.frames_dropped} frames dropped while indexing fell behind"
        return self._register(rec, index, opts, t0)

    def _thumb_dir(self, index_id: str) -> str:
        return os.path.join(self.dir, index_id + ".thumbs")

    def _save_thumbnail(self, index_id: str, chunk: int, rgb) -> None:
        import cv2

        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (160, max(1, round(h * 160 / w))), interpolation=cv2.INTER_AREA)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return
        # Under the lock so a DELETE racing this worker step either removes the file afterwards or makes
        # this write a no-op (it pops the record under the same lock before removing the folder).
        with self._lock:
            if index_id not in self.records:
                return
            os.makedirs(self._thumb_dir(index_id), exist_ok=True)
            with open(os.path.join(self._thumb_dir(index_id), f"{chunk}.jpg"), "wb") as f:
                f.write(jpg.tobytes())

    def thumbnail(self, index_id: str, chunk: int) -> bytes:
        """The JPEG of a chunk's first frame (404 when there is none)."""
        self.get(index_id)
        try:
            with open(os.path.join(self._thumb_dir(index_id), f"{int(chunk)}.jpg"), "rb") as f:
                return f.read()
        except (OSError, ValueError):
            raise ApiError(404, f"no thumbnail for chunk {chunk} of {index_id}", code="thumbnail_not_found") from None

    @staticmethod
    def live_ready(rec: IndexRecord, src) -> bool:
        # The first prefill step reads three chunks (the chunk, the one after it, and the look-ahead of
        # the frame encoder), each later step one more.
        need = (rec.chunk_frames or 1) * (3 if not rec.chunks_done else 1)
        return src.ended or src.available() >= need

    def _failed(self, rec: IndexRecord, e: BaseException) -> None:
        rec.status = "failed"
        rec.error = f"{type(e).__name__}: {e}"
        with self._lock:
            alive = rec.id in self.records
        if alive:
            self._write_record(rec)

    def _register(self, rec: IndexRecord, index, opts, t0: float, ctx: VideoContext | None = None) -> str:
        """Save a finished index (or keep it in memory only when its family's index cannot be saved) and
        make it answerable. ctx: the context a media family's prefill made, else one is made of index."""
        s = self.session
        if ctx is None:
            ctx = VideoContext(s, index, question_suffix=split_template(s, rec.system)[1],
                               **opts.question_kwargs())
        path, _ = self._paths(rec.id)
        family = media_module(s)
        if family is None or family.SAVES_INDEX:
            ctx.save(path + ".tmp")
            os.replace(path + ".tmp", path)
            size = os.path.getsize(path)
        else:
            rec.memory_only, size = True, None
            rec.note = (f"kept in memory only: an index of {family.__name__} cannot be saved; it is gone after a "
                        "restart")
        m = ctx.memory()
        rec.bytes = {"n_chunks": ctx.n_chunks, "sink": m["sink_bytes"], "high": m["high_bytes"],
                     "low": m["low_bytes"], "signature": m["signature_bytes"], "file": size}
        rec.chunks_done = rec.chunks_total = ctx.n_chunks
        rec.index_seconds = round(time.perf_counter() - t0, 3)
        rec.status = "ready"
        with self._lock:
            alive = rec.id in self.records
            if alive:
                self._loaded[rec.id] = ctx
        if alive:
            self._write_record(rec)
            self._fit_budget()
        else:  # deleted while indexing
            for p in self._paths(rec.id):
                if os.path.exists(p):
                    os.unlink(p)
            shutil.rmtree(self._thumb_dir(rec.id), ignore_errors=True)
        return rec.id

    # ------------------------------------------------------------------ use (worker thread)
    def recorded_end(self, rec: IndexRecord) -> float:
        """End (s) of what the index's source has recorded so far: a live source's newest frame, or a
        finished index's duration."""
        with self._lock:
            live = self.live.get(rec.id)
        last = None if live is None else live.source.last_ts
        if last is None and rec.duration_s is not None:
            return float(rec.duration_s)
        if last is None:
            last = rec.frame_times[-1] if rec.frame_times else 0.0
        return round(float(last) + frame_seconds(rec), 3)

    def answer_context(self, index_id: str) -> tuple[IndexRecord, VideoContext, bool]:
        """(record, context, live): a live index that still records is answered on a snapshot of the
        chunks indexed so far (rows shared with its prefill, made again only when more chunks are in)
        while its prefill goes on; any other index as context() gives it."""
        rec = self.get(index_id)
        with self._lock:
            live = self.live.get(index_id)
        if live is None or live.run.finished:
            return (*self.context(index_id), False)
        n = live.run.n_chunks
        if n == 0:
            raise ApiError(409, f"video index {index_id} is recording but no chunk is indexed yet (the first "
                                f"needs {3 * (rec.chunk_frames or 1)} frames)", code="index_not_ready")
        if live.ctx is None or live.ctx.n_chunks != n:
            s = self.session
            opts = X2LOptions.for_model(s, video=True)
            live.ctx = live.run.snapshot(question_suffix=split_template(s, rec.system)[1],
                                         **opts.question_kwargs())
        return rec, live.ctx, True

    def context(self, index_id: str) -> tuple[IndexRecord, VideoContext]:
        """The index's VideoContext (loaded now if needed), most recently used from now on."""
        rec = self.get(index_id)
        if rec.status != "ready":
            raise ApiError(409 if rec.status in ("queued", "indexing") else 400,
                           f"video index {index_id} is {rec.status}" + (f": {rec.error}" if rec.error else ""),
                           code="index_not_ready")
        with self._lock:
            ctx = self._loaded.get(index_id)
            if ctx is not None:
                self._loaded.move_to_end(index_id)
        if ctx is None and rec.memory_only:
            raise ApiError(410, f"video index {index_id} was kept in memory only and is gone", code="index_gone")
        if ctx is None:
            ctx = self._load(rec, mmap=False)
            with self._lock:
                self._loaded[index_id] = ctx
        self._fit_budget()
        with self._lock:
            return rec, self._loaded.get(index_id, ctx)

    def _load(self, rec: IndexRecord, *, mmap: bool) -> VideoContext:
        path, _ = self._paths(rec.id)
        opts = X2LOptions.for_model(self.session, video=True)
        family = media_module(self.session)
        kw = {} if family is None else family.context_kwargs(self.session, rec.system)
        return VideoContext.load(self.session, path, system=rec.system, mmap=mmap, **opts.question_kwargs(), **kw)

    def _fit_budget(self) -> None:
        """Most recently used first: indexes whose L tiers fit max_host_bytes together stay resident,
        the others are (re)loaded with their L tier memory-mapped from the index file."""
        if self.max_host_bytes <= 0:
            return
        with self._lock:
            order = list(reversed(self._loaded.items()))
        used = 0
        for index_id, ctx in order:
            low = ctx.memory()["low_bytes"]
            mapped = bool(ctx.n_chunks and ctx.chunk_info(0)["low_mapped"])
            want_mapped = used + low > self.max_host_bytes
            if not want_mapped:
                used += low
            if want_mapped != mapped:
                rec = self.records.get(index_id)
                if rec is None or rec.memory_only:  # nothing on disk to map
                    continue
                new = self._load(rec, mmap=want_mapped)
                with self._lock:
                    if index_id in self._loaded:
                        self._loaded[index_id] = new
