#!/usr/bin/env python3
"""llama.cpp's own HF -> GGUF converter, fetched from PyPI and run offline: the peer reference for
the two-file (model.gguf + mmproj.gguf) layouts x2l-edge reads.

    python tools/llama_cpp_converter.py fetch                 # once; prints the converter's folder
    python tools/llama_cpp_converter.py convert HF_DIR OUT_DIR [--outtype f32 q8_0]

writes OUT_DIR/model-{outtype}.gguf and OUT_DIR/mmproj-{outtype}.gguf for each outtype.

Where the converter comes from (first hit wins):
  1. $X2L_LLAMA_CPP_DIR: a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/);
  2. the cache folder (``cache_dir()``: $X2L_CACHE_DIR or ~/.cache/x2l-edge) from an earlier fetch;
  3. ``fetch()``: the llama-cpp-python 0.3.36 source distribution (76.6 MB, sha256-pinned), taken from
     $X2L_LLAMA_CPP_SDIST when that names the tarball, else downloaded with
     ``pip download --no-deps --no-build-isolation --no-binary llama-cpp-python``; only
     convert_hf_to_gguf.py, conversion/, gguf-py/ and LICENSE (2 MB) are extracted into the cache and
     the tarball is deleted. Nothing of llama.cpp is committed to this repository.

The converter runs in a child process (it puts its own gguf-py first on sys.path, which must not
leak into the caller) that imports it once and converts every requested file in turn: importing
torch + transformers + the converter costs ~7 s, one tiny conversion ~1-3 s. It needs torch,
transformers, numpy, safetensors and sentencepiece in the running interpreter (the `test` extra).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"


class ConverterUnavailable(RuntimeError):
    """The converter is not on this machine and could not be fetched; the message says why."""


def cache_dir() -> Path:
    base = os.environ.get("X2L_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "x2l-edge")
    return Path(base) / f"llama-cpp-converter-{VERSION}"


def _is_tree(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py").is_dir()


def find() -> Path | None:
    """The converter's folder if it is already here (env override or cache), else None."""
    env = os.environ.get("X2L_LLAMA_CPP_DIR")
    if env:
        if not _is_tree(Path(env)):
            raise ConverterUnavailable(f"X2L_LLAMA_CPP_DIR={env} has no convert_hf_to_gguf.py + gguf-py/")
        return Path(env)
    return cache_dir() if _is_tree(cache_dir()) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch() -> Path:
    """The converter's folder, extracting it from the (downloaded) sdist into the cache if needed."""
    found = find()
    if found is not None:
        return found
    dest = cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = os.environ.get("X2L_LLAMA_CPP_SDIST")
        if sdist:
            tarball = Path(sdist)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                   "--no-binary", "llama-cpp-python", f"llama-cpp-python=={VERSION}", "-d", tmp, "-q"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            tarball = Path(tmp) / SDIST
            if run.returncode != 0 or not tarball.is_file():
                raise ConverterUnavailable(
                    f"pip download of llama-cpp-python=={VERSION} failed (rc {run.returncode}): "
                    f"{(run.stderr or run.stdout).strip()[-500:]}")
        if not tarball.is_file():
            raise ConverterUnavailable(f"{tarball}: no such file")
        digest = _sha256(tarball)
        if digest != SDIST_SHA256:
            raise ConverterUnavailable(f"{tarball}: sha256 {digest}, expected {SDIST_SHA256}")
        staging = Path(tmp) / "tree"
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(_PREFIX) and m.name[len(_PREFIX):].startswith(_MEMBERS)
                       and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(_PREFIX):]
            tar.extractall(staging, members=members, filter="data")
        if not _is_tree(staging):
            raise ConverterUnavailable(f"{tarball}: no vendor/llama.cpp converter inside")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Another process may have fetched it meanwhile: keep whichever landed first.
        try:
            staging.rename(dest)
        except OSError:
            if not _is_tree(dest):
                shutil.rmtree(dest, ignore_errors=True)
                shutil.move(str(staging), str(dest))
    return dest


# The child: import the converter once, then run its main() once per job.
_RUNNER = r"""
import json, logging, sys
tree, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, tree)
sys.argv = ["convert_hf_to_gguf.py"]
import convert_hf_to_gguf as conv
logging.disable(logging.INFO)
for hf_dir, outfile, outtype, mmproj in jobs:
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", outfile, "--outtype", outtype] + (["--mmproj"] if mmproj else [])
    conv.main()
"""


def convert_jobs(jobs: list[tuple[str, str, str, bool]], tree: Path | None = None, timeout: float = 900) -> None:
    """Run llama.cpp's converter on each (hf_dir, outfile, outtype, mmproj) job in one child process."""
    tree = tree or fetch()
    run = subprocess.run([sys.executable, "-c", _RUNNER, str(tree), json.dumps([list(map(str, j[:3])) + [bool(j[3])]
                                                                              for j in jobs])],
                         capture_output=True, text=True, timeout=timeout)
    missing = [j[1] for j in jobs if not Path(j[1]).is_file()]
    if run.returncode != 0 or missing:
        raise RuntimeError(f"llama.cpp's converter failed (rc {run.returncode}; missing {missing}):\n"
                           f"{run.stderr[-3000:]}")


def convert_pair(hf_dir, out_dir, outtypes=("f32",), tree: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """{outtype: (model.gguf, mmproj.gguf)} converted from one HF checkpoint directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {t: (out / f"model-{t}.gguf", out / f"mmproj-{t}.gguf") for t in outtypes}
    jobs = [(str(hf_dir), str(p), t, mm) for t, pair in pairs.items() for p, mm in zip(pair, (False, True))]
    convert_jobs(jobs, tree)
    return pairs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="make the converter available in the cache; print its folder")
    c = sub.add_parser("convert", help="write OUT_DIR/model-T.gguf + OUT_DIR/mmproj-T.gguf")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--outtype", nargs="+", default=["f32"], choices=["f32", "f16", "bf16", "q8_0"])
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch())
        else:
            for t, (model, mmproj) in convert_pair(args.hf_dir, args.out_dir, args.outtype).items():
                print(t, model, mmproj)
    except (ConverterUnavailable, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
