"""A new user's first hour (issue 26): the README's code blocks run as written, every CLI option has help,
long steps report progress (bars on a terminal, a callback in the API, quiet otherwise), a CPU run of the
demo is free of warnings (at most one in a CUDA build without a device), and importing the package from
the source tree says what to do."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import x2l_edge
from x2l_edge import _core

ROOT = Path(__file__).resolve().parents[1]
CUDA_BUILD = _core.cuda_built() and not _core.cuda_emulated()


# ----------------------------------------------------------------------------- shared files

@pytest.fixture(scope="module")
def cache(tmp_path_factory, smollm2_path):
    """A private X2L_EDGE_CACHE (the tiny VLM is built there, never in ~/.cache) for this module."""
    d = tmp_path_factory.mktemp("x2l_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("X2L_EDGE_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def tiny_vlm(cache):
    return x2l_edge.models.tiny_vlm_path()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """video.mp4 (20 frames the tiny model knows, a needle card among them) and book.txt (a short story)."""
    from x2l_edge import tiny_vlm as T
    from x2l_edge.video import write_video

    d = tmp_path_factory.mktemp("first_hour")
    vid = T.needle_video(3, 20)
    write_video(d / "video.mp4", vid.frames, fps=1.0)
    rooms = ["kitchen", "garden", "attic", "cellar", "library", "hall"]
    story = [f"On day {i} Anna searched the {rooms[i % len(rooms)]} and found nothing but dust." for i in range(40)]
    story.insert(23, "On the last evening her brother Tom found the key under the blue stone in the garden.")
    (d / "book.txt").write_text(" ".join(story))
    return d


def _env(cache) -> dict:
    env = dict(os.environ, X2L_EDGE_CACHE=str(cache))  # the warnings filters a user has: Python's defaults
    env.pop("PYTHONWARNINGS", None)
    env.pop("X2L_CORE_PATH", None)
    return env


# ----------------------------------------------------------------------------- the README

def readme_blocks(path=ROOT / "README.md"):
    """[(language, code)] of the fenced blocks in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)


def _warnings(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "Warning" in ln or ln.startswith("warning:")]


@pytest.mark.parametrize("doc", ["README.md", "docs/x2l.md"])
def test_python_blocks_run_as_written(doc, files, cache, tiny_vlm):
    """Every ```python block of the README and docs/x2l.md, unchanged, in a folder holding the video.mp4 and
    book.txt it names (the installed package, not the source tree); no warning in a CPU build, one at most
    with CUDA."""
    blocks = [code for lang, code in readme_blocks(ROOT / doc) if lang == "python"]
    assert blocks and all("import x2l_edge" in b for b in blocks)
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=files, env=_env(cache), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(_warnings(r.stderr)) <= (1 if CUDA_BUILD else 0), r.stderr
    assert (files / "video.x2l").stat().st_size > 0  # ctx.save ran


def _readme_commands():
    """The README's shell commands, one per `&&`-separated step, comments dropped."""
    cmds = []
    for lang, code in readme_blocks():
        if lang != "bash":
            continue
        for line in code.splitlines():
            line = line.split("  #")[0].strip()
            cmds += [c.strip() for c in line.split("&&") if c.strip()]
    return cmds


# Steps the test does not run: installing the package itself and the test suite it is part of, and the server
# and its client (it runs until stopped; tests/test_server.py starts it and drives it, `ask --server` included).
_NOT_RUN = re.compile(r"^(pip install|pytest|python tests/cuda_emu/run\.py|x2l-edge serve |x2l-edge ask --server )")


def test_readme_commands_run(files, cache, tiny_vlm, tmp_path):
    """Every x2l-edge and tools/ command of the README, as written, with the placeholders it names filled in
    (HF_DIR: a tiny Llava-OneVision checkpoint; video.mp4: a generated video; `demo` on a shorter video).
    pip and pytest lines are the installation and the suite itself and are only checked to be there."""
    import tiny_models

    cmds = _readme_commands()
    assert any(c.startswith("pip install") for c in cmds) and "x2l-edge demo" in cmds
    hf = tiny_models.make_tiny_llava_onevision(tmp_path / "hf", seed=7)
    ran = 0
    for cmd in cmds:
        if _NOT_RUN.match(cmd):
            continue
        argv = [str(hf) if a == "HF_DIR" else a for a in shlex.split(cmd)]
        if argv[0] == "x2l-edge":
            argv = [sys.executable, "-m", "x2l_edge.cli"] + argv[1:]
            if argv[3:4] == ["demo"]:
                argv += ["--minutes", "0.3"]
        elif argv[:2] == ["python", "tools/convert.py"]:
            argv = [sys.executable, str(ROOT / "tools" / "convert.py")] + argv[2:]
        else:
            pytest.fail(f"the README has a command this test does not know how to run: {cmd}")
        r = subprocess.run(argv, cwd=files, env=_env(cache), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
        assert len(_warnings(r.stderr)) <= (1 if CUDA_BUILD else 0), (cmd, r.stderr)
        ran += 1
    assert ran >= 4


def test_demo_on_the_cpu_warnings_and_wording(cache, tiny_vlm, monkeypatch):
    """The demo on the CPU: no warning at all in a build without CUDA; in a CUDA build on a machine without a
    device, one (the fallback, said once although the demo opens two sessions). Its tiers are named by
    role and said to be in RAM: no 'device' anywhere in its output."""
    import io
    import warnings

    from x2l_edge import demo
    from x2l_edge import device as D

    monkeypatch.setattr(D, "_warned", set())
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo.run(minutes=0.2, seed=2, threads=2, stream=out)
    expected = 1 if CUDA_BUILD and _core.cuda_device_count() == 0 else 0
    assert len(caught) == expected, [str(w.message) for w in caught]
    text = out.getvalue()
    assert "resident tier H" in text and "host tier L" in text and "in RAM" in text and "(CPU backend)" in text
    assert "device" not in text.lower()


# ----------------------------------------------------------------------------- the command line

def _parsers():
    """{'': the top parser, command: its parser}, captured from cli.main without running anything."""
    from x2l_edge import cli

    got = {}

    def capture(self, args=None, namespace=None):
        got["top"] = self
        raise SystemExit(0)

    mp = pytest.MonkeyPatch()
    mp.setattr(argparse.ArgumentParser, "parse_args", capture)
    try:
        with pytest.raises(SystemExit):
            cli.main([])
    finally:
        mp.undo()
    top = got["top"]
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"": top, **sub.choices}


def test_every_cli_option_has_help():
    from x2l_edge import cli

    parsers = _parsers()
    assert {"ask", "chat", "demo", "generate", "info"} <= set(parsers)
    for name, p in parsers.items():
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help and a.help.strip(), f"x2l-edge {name}: {a.option_strings or a.dest} has no help"
            if (a.option_strings and a.default is not None and a.default is not False
                    and a.default != argparse.SUPPRESS and "default" not in a.help):
                label = cli._HelpFormatter(prog="x")._get_help_string(a)
                assert "(default: %(default)s)" in label, (name, a.dest)
                assert f"(default: {a.default})" in " ".join(text.split()), (name, a.dest)


def test_cli_version_and_no_command(capsys):
    from x2l_edge import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"x2l-edge {x2l_edge.__version__}"
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: x2l-edge" in out and "demo" in out and "COMMAND --help" in out


def test_cli_ask_needs_a_model_or_tiny(capsys):
    from x2l_edge import cli

    for argv in (["ask", "video.mp4", "What?"], ["ask", "--tiny", "m.gguf", "video.mp4", "What?"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and "--tiny VIDEO QUESTION" in capsys.readouterr().err


def test_cli_warnings_are_one_line(capsys):
    """Through the CLI a warning is one 'warning: ...' line, not a file:line plus source."""
    from x2l_edge import cli

    old = __import__("warnings").showwarning
    try:
        cli._show_warning("x2l-edge: something", RuntimeWarning, "f.py", 3)
        assert capsys.readouterr().err == "warning: x2l-edge: something\n"
    finally:
        __import__("warnings").showwarning = old


# ----------------------------------------------------------------------------- progress

def test_progress_callback_reports_every_step(files, tiny_vlm):
    s = x2l_edge.Session(tiny_vlm, n_threads=2, device="cpu")
    calls = []
    ctx = s.prefill(str(files / "video.mp4"), chunk_frames=8, progress=lambda *a: calls.append(a))
    by = {step: [(d, t) for st, d, t in calls if st == step] for step in ("decode", "encode", "index")}
    assert set(st for st, _, _ in calls) == set(by)
    assert by["decode"] == [(i, 20) for i in range(1, 21)]
    assert by["encode"] == [(8, 20), (16, 20), (20, 20)]
    assert by["index"] == [(i, 3) for i in range(4)] and ctx.n_chunks == 3
    # the order is causal: a chunk is indexed after its frames are encoded, frames encoded after decoding
    seq = [(st, d) for st, d, _ in calls]
    assert seq.index(("encode", 16)) > seq.index(("decode", 16)) and seq.index(("index", 2)) > seq.index(("encode", 16))

    calls.clear()
    text = s.prefill_text((files / "book.txt").read_text()[:600], chunk_tokens=60, progress=lambda *a: calls.append(a))
    assert calls == [("index", i, text.n_chunks) for i in range(text.n_chunks + 1)] and text.n_chunks >= 2

    calls.clear()
    s.ask(str(files / "video.mp4"), "What is the secret word?", mode="full", chunk_frames=10, max_tokens=4,
          progress=lambda *a: calls.append(a))
    assert [(d, t) for st, d, t in calls if st == "prefill"] == [(1, 2), (2, 2)]


def test_progress_callback_can_stop(files, tiny_vlm):
    s = x2l_edge.Session(tiny_vlm, n_threads=2, device="cpu")
    seen = []

    def stop_after_first_chunk(step, done, total):
        seen.append((step, done))
        return False if (step, done) == ("index", 1) else None

    with pytest.raises(KeyboardInterrupt, match="progress callback"):
        s.prefill_text((files / "book.txt").read_text()[:600], chunk_tokens=60, progress=stop_after_first_chunk)
    assert seen[-1] == ("index", 1)


def test_progress_bars_only_on_a_terminal_or_when_asked(files, tiny_vlm, capsys):
    from x2l_edge.progress import Progress

    s = x2l_edge.Session(tiny_vlm, n_threads=2, device="cpu")
    book = (files / "book.txt").read_text()[:600]
    s.prefill_text(book, chunk_tokens=100)  # progress=None; pytest's stderr is not a terminal
    s.prefill_text(book, chunk_tokens=100, progress=False)
    assert capsys.readouterr().err == ""
    s.prefill_text(book, chunk_tokens=100, progress=True)
    err = capsys.readouterr().err
    assert "bi-level index" in err and "chunk" in err

    class Tty:
        def __init__(self):
            self.parts = []

        def isatty(self):
            return True

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass

    tty = Tty()
    with Progress(None, stream=tty) as p:
        assert p.active
        for i in range(3):
            p.update("decode", i + 1, 3)
    assert "decode frames" in "".join(tty.parts) and "3/3" in "".join(tty.parts)
    assert not Progress(None, stream=open(os.devnull, "w")).active
    with pytest.raises(TypeError, match="progress must be"):
        Progress("yes")


def test_convert_progress_callback(tiny_hf, tmp_path):
    import convert

    calls = []
    convert.convert(tiny_hf["llama"], tmp_path / "m.gguf", "f32", progress=lambda *a: calls.append(a))
    n = calls[-1][2]
    assert n > 5 and calls == [("convert", i, n) for i in range(1, n + 1)]


# ----------------------------------------------------------------------------- odds and ends

def test_import_from_the_source_tree_says_what_to_do(tmp_path):
    """`python -c "import x2l_edge"` in a checkout (no compiled _core next to the sources) tells the user
    to install the package or point X2L_CORE_PATH at the build, instead of a bare ModuleNotFoundError."""
    env = {k: v for k, v in os.environ.items() if k not in ("X2L_CORE_PATH", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", "import x2l_edge"], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode == 0:
        pytest.skip("this checkout has a compiled _core next to its sources (an in-place build)")
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: x2l_edge was imported from its source tree"), r.stderr
    assert "pip install ." in last and "X2L_CORE_PATH" in last


def test_tiny_vlm_path_is_public(tiny_vlm):
    assert tiny_vlm == x2l_edge.models.tiny_vlm_path() and tiny_vlm.endswith(".gguf")
    assert x2l_edge.GGUFFile.open(tiny_vlm).get("clip.has_vision_encoder")


def test_pytest_reports_skips_and_durations():
    tomllib = pytest.importorskip("tomllib")
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "-rs" in opts.split() and any(o.startswith("--durations") for o in opts.split())
