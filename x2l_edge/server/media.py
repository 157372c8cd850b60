"""Where the server's media come from: file:// URLs confined to --media-dir, and data: URLs.

Every error is an ApiError with the HTTP status the client should see."""
from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
import urllib.parse


class ApiError(Exception):
    """An error returned to the client as OpenAI error JSON with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 410: "not_found_error", 413: "request_too_large",
             501: "not_implemented_error", 503: "server_busy"}

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_data_url(url: str, *, kind: str, max_bytes: int) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data URL whose type is kind/* (kind: 'image' or 'video')."""
    m = _DATA_URL.match(url)
    if not m or not m.group("b64"):
        raise ApiError(400, f"expected a base64 data URL (data:{kind}/...;base64,...)", code="invalid_data_url")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith(kind + "/"):
        raise ApiError(400, f"data URL type {mime or '(none)'!r} is not {kind}/*", code="invalid_data_url")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"the {kind} in the data URL is larger than {max_bytes} bytes", code="too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the data URL is not valid base64: {e}", code="invalid_data_url") from None
    if not data:
        raise ApiError(400, "the data URL is empty", code="invalid_data_url")
    return mime, data


def resolve_media_path(url: str, media_dir: str | None) -> str:
    """The real path of a file:// URL, which must name a regular file inside media_dir.

    Refused (403): no media dir configured, '..' components, and any path whose real path (symlinks
    resolved) is outside the media dir's real path."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise ApiError(400, f"unsupported URL scheme {parsed.scheme!r}", code="unsupported_url")
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(400, "file:// URLs must not name a host", code="unsupported_url")
    if media_dir is None:
        raise ApiError(403, "file:// URLs are disabled: start the server with --media-dir DIR",
                       code="media_dir_not_set")
    path = urllib.parse.unquote(parsed.path)
    if "\x00" in path:
        raise ApiError(400, "invalid path", code="invalid_path")
    if ".." in path.replace("\\", "/").split("/"):
        raise ApiError(403, "'..' is not allowed in media paths", code="path_outside_media_dir")
    root = os.path.realpath(media_dir)
    # Relative file: URLs (file:clip.mp4) and absolute ones are both taken relative to / then checked.
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root, real]) != root:
        raise ApiError(403, "the file is outside the media directory", code="path_outside_media_dir")
    if not os.path.isfile(real):
        raise ApiError(404, "no such file in the media directory", code="file_not_found")
    return real


def write_temp(data: bytes, suffix: str, tmp_dir: str) -> str:
    """Write uploaded bytes to a private temporary file (the caller deletes it)."""
    fd, path = tempfile.mkstemp(suffix=suffix, dir=tmp_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


SUFFIX = {"video/mp4": ".mp4", "video/x-matroska": ".mkv", "video/webm": ".webm", "video/avi": ".avi",
          "video/x-msvideo": ".avi", "video/quicktime": ".mov", "video/mpeg": ".mpg"}


def decode_image(data: bytes):
    """RGB uint8 [H, W, 3] from encoded image bytes (PNG, JPEG, ...)."""
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ApiError(400, "the image could not be decoded", code="invalid_image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
