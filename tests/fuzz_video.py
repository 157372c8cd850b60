"""atheris fuzz target for the video path: any file given to open_video() either yields RGB frames that
the preprocessor turns into model inputs, or raises VideoError (a ValueError); never a crash, a hang
or another exception type.

    python tests/fuzz_video.py -runs=500 CORPUS_DIR          # seed: tests/fuzz_corpus/video
    python tests/fuzz_video.py --make-seed tests/fuzz_corpus/video

The first input byte picks the file name's extension (OpenCV picks a demuxer by content and name).
"""
import os
import sys
import tempfile

import atheris
import numpy as np

with atheris.instrument_imports():
    from x2l_edge import video

EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".gif")
_state = {}


def make_seed(out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    video.write_video(os.path.join(out_dir, "seed.avi"), frames, fps=2.0, codec="MJPG")
    # the fuzz input format: extension byte, then the file
    data = open(os.path.join(out_dir, "seed.avi"), "rb").read()
    os.remove(os.path.join(out_dir, "seed.avi"))
    with open(os.path.join(out_dir, "seed"), "wb") as f:
        f.write(bytes([0]) + data)


def test_one(data: bytes) -> None:
    if not data:
        return
    path = _state["base"] + EXTENSIONS[data[0] % len(EXTENSIONS)]
    with open(path, "wb") as f:
        f.write(data[1:])
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
    _state["base"] = os.path.join(tempfile.mkdtemp(prefix="x2l_fuzz_video_"), "input")
    _state["pre"] = video.VideoPreprocessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "square")
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
