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
    print(f"leak_check: {refused} inputs refused, done")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
