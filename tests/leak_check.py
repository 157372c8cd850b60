"""LeakSanitizer pass (.ci/sanitize.sh): loads, uses and refuses GGUF files and X²L indexes in a loop,
then exits; LSan reports any allocation of the C++ core left unreachable. Not a pytest module."""
import os
import random
import sys
import tempfile
from pathlib import Path

import x2l_edge
from x2l_edge import _core, models
from x2l_edge.x2l import VideoContext, prefill_chunks

HERE = Path(__file__).resolve().parent


def main():
    rng = random.Random(7)
    gguf = (HERE / "fuzz_corpus" / "gguf" / "seed.gguf").read_bytes()
    index = (HERE / "fuzz_corpus" / "index" / "seed.x2l").read_bytes()
    d = Path(tempfile.mkdtemp())
    refused = 0
    for i in range(200):
        for data, load in ((gguf, _core.GGUFFile.from_bytes), (index, _core.VideoIndex.from_bytes)):
            b = bytearray(data)
            if i:
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            try:
                load(bytes(b))
            except x2l_edge.FormatError:
                refused += 1
    (d / "seed.x2l").write_bytes(index)
    for mmap in (False, True) * 5:
        ix = _core.VideoIndex.load(str(d / "seed.x2l"), mmap=mmap)
        for c in range(ix.n_chunks):
            ix.low_rows(c, 0, 0, False)
    s = x2l_edge.Session(models.smollm2_path(), n_threads=2, n_ctx=256, device="cpu")
    ids = s.tokenize("a red star, then the number seven, then the secret word piano. " * 3, special=False)
    ix, _ = prefill_chunks(s, [ids[i:i + 8] for i in range(0, 24, 8)], sink_ids=ids[:3], ratio_low=2, ratio_high=4)
    ix.save(str(d / "s.x2l"))
    for mmap in (False, True):
        ctx = VideoContext.load(s, d / "s.x2l", mmap=mmap)
        ctx.scores("the secret word?", scorer="attention")
        ctx.ask("the secret word?", chunks=[1], max_tokens=2)
    try:
        VideoContext(s, _core.VideoIndex.from_bytes(index), question_suffix="")
    except x2l_edge.Error:
        refused += 1
    cancelled = cancel_paths(s, ids, d)
    print(f"leak_check: {refused} inputs refused, {cancelled} calls cancelled, done")
    sys.stdout.flush()


def cancel_paths(s, ids, d):
    """Cancelled native calls unwind without leaking (issue 24): each kind of long call is cancelled at its
    first check (the request made before it) and, for eval and the vision tower, in the middle (a timer)."""
    import threading

    import numpy as np

    from x2l_edge import tiny_vlm

    cancelled = 0

    def expect_cancel(fn):
        nonlocal cancelled
        try:
            fn()
        except x2l_edge.CancelledError:
            cancelled += 1

    ctx = s.prefill_text("a red star, then the number seven, then the secret word piano. " * 4, chunk_tokens=16,
                         progress=False)
    # native calls made outside a Session operation see a request made before them at their first check
    for fn in (lambda: s._s.eval(ids),
               lambda: prefill_chunks(s, [ids[i:i + 8] for i in range(0, 24, 8)], sink_ids=ids[:3])):
        s._s.cancel()
        expect_cancel(fn)
    long_ids = (ids * 8)[:200]

    def long_eval():
        with s.exclusive():
            s.reset()
            s.eval(long_ids)

    for i in range(4):  # and cancels arriving in the middle of operations
        for fn in (long_eval, lambda: ctx.ask("the secret word?", max_tokens=4),
                   lambda: ctx.scores("the secret word?", scorer="attention")):
            t = threading.Timer(0.01 * (i + 1), s.cancel)
            t.start()
            expect_cancel(fn)
            t.join()
    os.environ["X2L_EDGE_CACHE"] = str(d / "cache")
    vlm = x2l_edge.Session(models.tiny_vlm_path(), n_threads=2, n_ctx=512, device="cpu")
    px = vlm.preprocessor.batch(list(tiny_vlm.needle_video(1, 4).frames))
    big = np.repeat(px, 16, axis=0)
    vlm._s.cancel()
    expect_cancel(lambda: vlm.vision.encode(px, session=vlm._s))
    for i in range(4):
        t = threading.Timer(0.02 * (i + 1), vlm.cancel)
        t.start()
        expect_cancel(lambda: vlm.encode_frames(big))
        t.join()
    return cancelled


if __name__ == "__main__":
    main()
