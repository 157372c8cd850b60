#!/usr/bin/env python3
"""llama.cpp's own HF -> GGUF converter, fetched from PyPI and run offline: the peer reference for
the two-file (model.gguf + mmproj.gguf) layouts x2l-edge reads.

    python tools/llama_cpp_converter.py fetch                 # once; prints the converter's folder
    python tools/llama_cpp_converter.py convert HF_DIR OUT_DIR [--outtype f32 q8_0]

writes OUT_DIR/model-{outtype}.gguf and OUT_DIR/mmproj-{outtype}.gguf for each outtype. LLaVA-1.5 mmproj files
come from llama.cpp's legacy tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py instead
(convert_legacy_llava(); its convert_hf_to_gguf.py writes no LLaVA mmproj), taken from the same sdist.

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


def _sdist(tmp: str) -> Path:
    """The pinned sdist: $X2L_LLAMA_CPP_SDIST, else downloaded into tmp; its sha256 checked."""
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
    return tarball


def fetch() -> Path:
    """The converter's folder, extracting it from the (downloaded) sdist into the cache if needed."""
    found = find()
    if found is not None:
        return found
    dest = cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _sdist(tmp)
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


# llama.cpp writes LLaVA-1.5 mmproj files with this script, not with convert_hf_to_gguf.py.
LEGACY_LLAVA = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"


def legacy_llava_script(tree: Path | None = None) -> Path:
    """llama.cpp's legacy LLaVA image-encoder converter, taken from the same pinned sdist into the
    converter's folder (once)."""
    tree = tree or fetch()
    dest = tree / LEGACY_LLAVA
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _sdist(tmp)
        with tarfile.open(tarball, "r:gz") as tar:
            member = tar.getmember(_PREFIX + LEGACY_LLAVA)
            data = tar.extractfile(member).read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".{os.getpid()}.part")
    part.write_bytes(data)
    os.replace(part, dest)
    return dest


# The script expects transformers 4's CLIPVisionModel, whose tower sits under .vision_model (it cuts
# model.vision_model.encoder.layers and names tensors from "vision_model.*"); transformers 5 flattened
# that module. The runner gives the script that nesting back around the same weights and runs it as is.
_LEGACY_RUNNER = r"""
import json, runpy, sys
import torch, transformers
from transformers.models.clip import modeling_clip
argv = json.loads(sys.argv[1])
_Flat = modeling_clip.CLIPVisionModel
if not hasattr(_Flat(transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                   num_attention_heads=1, image_size=4, patch_size=2)), "vision_model"):
    class CLIPVisionModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.vision_model = inner
        @classmethod
        def from_pretrained(cls, path, **kw):
            return cls(_Flat.from_pretrained(path, **kw))
    modeling_clip.CLIPVisionModel = CLIPVisionModel  # what `from transformers import CLIPVisionModel` resolves
sys.argv = argv
runpy.run_path(argv[0], run_name="__main__")
"""


def convert_legacy_llava(vision_dir, projector, out_dir, tree: Path | None = None, timeout: float = 600) -> Path:
    """mmproj of a LLaVA-1.5 checkpoint split as llava_surgery does (vision_dir: a CLIPVisionModel folder;
    projector: a torch file of the projector's tensors), written by llama.cpp's legacy script with
    --clip-model-is-vision --use-f32 (its patch kernel stays f16). Returns the mmproj's path."""
    tree = tree or fetch()
    script = legacy_llava_script(tree)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    argv = [str(script), "-m", str(vision_dir), "--llava-projector", str(projector), "--output-dir", str(out),
            "--clip-model-is-vision", "--use-f32"]
    run = subprocess.run([sys.executable, "-c", _LEGACY_RUNNER, json.dumps(argv)], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=str(out))
    path = out / "mmproj-model-f32.gguf"
    if run.returncode != 0 or not path.is_file():
        raise RuntimeError(f"llama.cpp's legacy LLaVA converter failed (rc {run.returncode}):\n"
                           f"{(run.stderr or run.stdout)[-3000:]}")
    return path


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
