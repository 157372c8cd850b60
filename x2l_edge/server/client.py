"""A small client of `x2l-edge serve` for `x2l-edge ask --server URL` (standard library only: it runs
where the server's extra is not installed).

    c = ServerClient("http://127.0.0.1:8080", api_key="KEY")
    vid = c.upload("clip.mp4")                      # or c.index_url("file:///videos/clip.mp4")
    c.wait(vid)
    for piece in c.ask(vid, "What is written on the sign?"):
        print(piece, end="")
    print(c.last_x2l["chunks"])
"""
from __future__ import annotations

import json
import mimetypes
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request


class ServerError(Exception):
    """The server answered with an error (OpenAI's error JSON), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class ServerClient:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"the server URL must be http(s)://HOST:PORT (got {url!r})")
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.api_key = api_key
        self.timeout = timeout
        self.last_x2l = None    # the x2l field of the last answer (chunks and time ranges reloaded)
        self.last_usage = None

    # ------------------------------------------------------------------ transport
    def _open(self, method: str, path: str, *, body=None, headers=None, timeout=None):
        h = {"User-Agent": "x2l-edge-cli", **(headers or {})}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=body, headers=h, method=method)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise _server_error(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(0, f"cannot reach the x2l-edge server at {self.base}: {reason} (is `x2l-edge serve` "
                                 "running there?)", code="unreachable") from None

    def _json(self, method: str, path: str, payload=None):
        body = None if payload is None else json.dumps(payload).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        with self._open(method, path, body=body, headers=headers) as r:
            return json.loads(r.read() or b"null")

    # ------------------------------------------------------------------ indexes
    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["data"]

    def index_url(self, url: str, **fields) -> str:
        """Index a video the server can open (file:// inside its --media-dir; with --allow-live a stream)."""
        return self._json("POST", "/v1/videos", {"url": url, **_fields(fields)})["id"]

    def upload(self, path: str, **fields) -> str:
        """Upload a local video (streamed from disk as multipart/form-data) and index it."""
        size = os.path.getsize(path)
        boundary = "x2l" + secrets.token_hex(12)
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in _fields(fields).items())
        name = os.path.basename(path).replace('"', "_")
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 f"Content-Type: {mime}\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body():
            yield head
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    yield block
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        with self._open("POST", "/v1/videos", body=body(), headers=headers, timeout=max(self.timeout, 600)) as r:
            return json.loads(r.read())["id"]

    def index(self, index_id: str) -> dict:
        return self._json("GET", f"/v1/videos/{urllib.parse.quote(index_id)}")

    def wait(self, index_id: str, *, progress=None, poll_s: float = 0.5) -> dict:
        """Wait until the index is ready; progress(chunks_done, chunks_total) while it is being built."""
        while True:
            d = self.index(index_id)
            if d["status"] == "ready":
                return d
            if d["status"] == "failed":
                raise ServerError(400, f"indexing {index_id} failed: {d.get('error')}", code="index_failed")
            if progress is not None:
                p = d.get("progress") or {}
                progress(p.get("chunks_done") or 0, p.get("chunks_total"))
            time.sleep(poll_s)

    def delete(self, index_id: str) -> None:
        self._json("DELETE", f"/v1/videos/{urllib.parse.quote(index_id)}")

    # ------------------------------------------------------------------ questions
    def ask(self, index_id: str, question: str, *, max_tokens: int = 64, temperature: float = 0.0,
            top_k: int | None = None, scorer: str | None = None, last_seconds: float | None = None):
        """Stream the answer's text pieces; afterwards last_x2l holds the chunks and time ranges used."""
        part = {"id": index_id}
        if last_seconds is not None:
            part["last_seconds"] = last_seconds
        x2l = {k: v for k, v in (("top_k", top_k), ("scorer", scorer)) if v is not None}
        body = {"model": "x2l-edge", "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_tokens, "temperature": temperature,
                "messages": [{"role": "user", "content": [{"type": "video_index", "video_index": part},
                                                          {"type": "text", "text": question}]}]}
        if x2l:
            body["x2l"] = x2l
        self.last_x2l = self.last_usage = None
        resp = self._open("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
                          timeout=max(self.timeout, 600))
        with resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                msg = json.loads(data)
                if "error" in msg:
                    err = msg["error"] or {}
                    raise ServerError(400, err.get("message", "error"), code=err.get("code"))
                if msg.get("x2l") is not None:
                    self.last_x2l = msg["x2l"]
                if msg.get("usage"):
                    self.last_usage = msg["usage"]
                for choice in msg.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        raise ServerError(502, "the answer stream ended early (no [DONE])", code="truncated")


def _fields(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _server_error(e: urllib.error.HTTPError) -> ServerError:
    try:
        err = json.loads(e.read()).get("error") or {}
        return ServerError(e.code, f"server: {e.code} {err.get('message', e.reason)}", code=err.get("code"))
    except (ValueError, AttributeError, OSError):
        return ServerError(e.code, f"server: {e.code} {e.reason}")
