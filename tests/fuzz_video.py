"""atheris fuzz target for the video path: any file given to open_video() either yields RGB frames that
the preprocessor turns into model inputs, or raises VideoError (a ValueError); never a crash, a hang
or another exception type.

    python tests/fuzz_video.py -runs=500 CORPUS_DIR          # seed: tests/fuzz_corpus/video
    python tests/fuzz_video.py --make-seed tests/fuzz_corpus/video

Inputs are mutation recipes applied to the seed video (tests/fuzz_mutate.py), or raw files; the first
input byte also picks the file name's extension (OpenCV picks a demuxer by content and name).
"""
import os
import sys
import tempfile

import atheris
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_mutate import mutate  # noqa: E402

with atheris.instrument_imports():
    from x2l_edge import video

EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".gif")
_state = {}


def make_seed(out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    video.write_video(os.path.join(out_dir, "seed.avi"), frames, fps=2.0, codec="MJPG")
    # also a raw input (odd first byte: the rest is the file, .avi)
    data = open(os.path.join(out_dir, "seed.avi"), "rb").read()
    with open(os.path.join(out_dir, "raw"), "wb") as f:
        f.write(bytes([1]) + data)


def test_one(data: bytes) -> None:
    if not data:
        return
    path = _state["base"] + EXTENSIONS[data[0] // 2 % len(EXTENSIONS)]
    with open(path, "wb") as f:
        f.write(mutate(_state["seed"], data))
    try:
        v = video.open_video(path, max_frames=4)
        for fr in v.frames():
            assert fr.rgb.dtype == np.uint8 and fr.rgb.ndim == 3 and fr.rgb.shape[2] == 3
            x = _state["pre"].batch([fr.rgb])
            assert x.shape == (1, 3, 32, 32) and np.isfinite(x).all()
    except video.VideoError:
        pass
    finally:
        os.remove(path)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seed":
        make_seed(sys.argv[2])
        return
    seed_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_corpus", "video")
    _state["seed"] = open(os.path.join(seed_dir, "seed.avi"), "rb").read()
    _state["base"] = os.path.join(tempfile.mkdtemp(prefix="x2l_fuzz_video_"), "input")
    _state["pre"] = video.VideoPreprocessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "square")
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
