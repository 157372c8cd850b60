"""Live video sources (an MJPEG stream over HTTP, an RTSP URL, a local camera) read on their own thread.

The reader keeps at most ``queue_frames`` frames (the oldest are dropped, and counted, when indexing
falls behind), so memory stays bounded by that queue plus the index's tiers. The index job takes
frames chunk by chunk; a stream that ends or breaks ends the index with what it has."""
from __future__ import annotations

import collections
import math
import threading
import time
import urllib.request

import numpy as np

from ..video import Frame

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


class LiveSource:
    def __init__(self, url: str, *, fps: float | None = None, max_frames: int = 3600,
                 max_seconds: float | None = None, queue_frames: int = 64, connect_timeout: float = 10.0):
        self.url = url
        self.fps = fps
        self.max_frames = int(max_frames)
        self.max_seconds = max_seconds
        self.connect_timeout = connect_timeout
        self._q: collections.deque = collections.deque()
        self._queue_frames = int(queue_frames)
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self.ended = False
        self.end_reason = None
        self.frames_read = 0       # frames taken from the source (after the fps selection)
        self.last_ts = None        # arrival time (s since the first frame) of the newest frame taken
        self.frames_dropped = 0    # dropped because indexing fell behind
        self._thread = threading.Thread(target=self._run, name="x2l-live-source", daemon=True)

    def start(self) -> "LiveSource":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ consumer side
    def available(self) -> int:
        with self._cv:
            return len(self._q)

    def frames(self):
        """Frames in arrival order until the source ends (blocks while the queue is empty)."""
        while True:
            with self._cv:
                while not self._q and not self.ended:
                    self._cv.wait(0.5)
                if not self._q:
                    return
                item = self._q.popleft()
            yield item

    # ------------------------------------------------------------------ reader thread
    def _put(self, rgb: np.ndarray, ts: float, index: int) -> None:
        with self._cv:
            if len(self._q) >= self._queue_frames:
                self._q.popleft()
                self.frames_dropped += 1
            self._q.append(Frame(index, ts, rgb))
            self.last_ts = ts
            self._cv.notify_all()

    def _run(self):
        reason = "the stream ended"
        try:
            t0, c_prev, n_in = None, -1, 0
            for rgb in self._read():
                if self._stop.is_set():
                    reason = "stopped"
                    break
                now = time.monotonic()
                t0 = now if t0 is None else t0
                ts = now - t0
                if self.max_seconds is not None and ts > self.max_seconds:
                    reason = f"max_seconds ({self.max_seconds}) reached"
                    break
                n_in += 1
                if self.fps:
                    c = int(math.floor(ts * self.fps + 1e-9))
                    if c <= c_prev:
                        continue
                    c_prev = c
                self._put(rgb, ts, n_in - 1)
                self.frames_read += 1
                if self.frames_read >= self.max_frames:
                    reason = f"max_frames ({self.max_frames}) reached"
                    break
        except Exception as e:  # noqa: BLE001 -- a lost stream ends the index, it never takes the server down
            reason = f"the stream was lost: {type(e).__name__}: {e}"
        with self._cv:
            self.ended = True
            self.end_reason = reason
            self._cv.notify_all()

    def _read(self):
        if self.url.startswith(("http://", "https://")):
            yield from self._read_mjpeg()
        else:
            yield from self._read_cv2()

    def _read_mjpeg(self):
        """JPEG frames of a multipart/x-mixed-replace (or bare concatenated JPEG) HTTP stream."""
        import cv2

        req = urllib.request.Request(self.url, headers={"User-Agent": "x2l-edge"})
        with urllib.request.urlopen(req, timeout=self.connect_timeout) as resp:
            buf = b""
            while not self._stop.is_set():
                block = resp.read1(1 << 16) if hasattr(resp, "read1") else resp.read(1 << 16)
                if not block:
                    return
                buf += block
                while True:
                    a = buf.find(SOI)
                    if a < 0:
                        buf = buf[-1:]
                        break
                    b = buf.find(EOI, a + 2)
                    if b < 0:
                        buf = buf[a:]
                        if len(buf) > 32 << 20:
                            raise ValueError("a JPEG frame larger than 32 MiB")
                        break
                    jpg, buf = buf[a:b + 2], buf[b + 2:]
                    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
                    if img is not None:
                        yield cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def _read_cv2(self):
        """camera:N (a local device) or rtsp://... through OpenCV (its FFmpeg backend for streams, with
        open and read timeouts so that an unreachable camera ends the source instead of hanging it)."""
        import cv2

        if self.url.startswith("camera:"):
            cap = cv2.VideoCapture(camera_number(self.url))
        else:
            ms = int(self.connect_timeout * 1000)
            cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        try:
            if not cap.isOpened():
                raise OSError(f"cannot open {self.url}")
            fails, last_frame = 0, time.monotonic()
            while not self._stop.is_set():
                ok, img = cap.read()
                if not ok:
                    # Lost: 8 failed reads in a row, or no frame for the timeout (a read that waited for it).
                    fails += 1
                    if fails >= 8 or time.monotonic() - last_frame >= self.connect_timeout:
                        return
                    time.sleep(0.05)
                    continue
                fails, last_frame = 0, time.monotonic()
                yield cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()


def camera_number(url: str) -> int:
    """N of camera:N (a local capture device, /dev/videoN on Linux)."""
    n = url.split(":", 1)[1]
    if not n.isdigit() or len(n) > 4:
        raise ValueError(f"camera URLs are camera:N with N a device number (got {url[:40]!r})")
    return int(n)
