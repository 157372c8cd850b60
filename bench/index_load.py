"""What checking a saved index costs (issue 24): load time of a SmolLM2 index read into memory (every
section hashed and validated) against a mapped load (L checked lazily) and the first use of every L
chunk after a mapped load; plus how many weight bytes the model fingerprint hashes.

    python bench/index_load.py [--tokens 1024] [--repeat 7]      # -> bench/results/index_load.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import build_info, cpu_name, write_json  # noqa: E402

import x2l_edge  # noqa: E402
from x2l_edge import _core, models  # noqa: E402
from x2l_edge.x2l import prefill_chunks  # noqa: E402


def median_time(fn, repeat):
    """Median wall and CPU (this process) seconds: on a shared machine CPU time is the steadier one."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--index", help="time this saved SmolLM2 index instead of building one")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "index_load.json"))
    a = ap.parse_args()

    path = models.smollm2_path()
    s = x2l_edge.Session(path, n_threads=2, device="cpu")
    f = a.index
    if f is None:
        f = build_index(s, a)
    size = os.path.getsize(f)
    data = open(f, "rb").read()
    n_chunks = _core.VideoIndex.load(f).n_chunks
    repeat_body(s, a, path, f, size, data, n_chunks)


def build_index(s, a):
    text = "The quick brown fox jumps over the lazy dog while the camera pans across the valley. " * 200
    ids = s.tokenize(text, special=False)[: a.tokens]
    chunks = [ids[i:i + a.chunk] for i in range(0, len(ids), a.chunk)]
    # ratio_low 1: the L tier uncompressed, the largest file per token.
    index, _ = prefill_chunks(s, chunks, sink_ids=ids[:8], ratio_low=1, ratio_high=16)
    f = os.path.join(tempfile.mkdtemp(), "bench.x2l")
    index.save(f)
    return f


def repeat_body(s, a, path, f, size, data, n_chunks):
    def mapped_and_used():
        ix = _core.VideoIndex.load(f, mmap=True)
        for c in range(ix.n_chunks):
            ix.low_rows(c, 0, 0, False)  # verifies chunk c's L section on first use

    res = {}
    for name, fn in (("load_copy", lambda: _core.VideoIndex.load(f)),
                     ("load_mmap", lambda: _core.VideoIndex.load(f, mmap=True)),
                     ("load_mmap_then_every_L_chunk_verified", mapped_and_used),
                     ("from_bytes_verified", lambda: _core.VideoIndex.from_bytes(data)),
                     ("from_bytes_unverified", lambda: _core.VideoIndex.from_bytes(data, verify_checksums=False))):
        wall, cpu = median_time(fn, a.repeat)
        res[name] = {"wall_s": wall, "cpu_s": cpu, "GB_per_cpu_s": size / cpu / 1e9}
    g = _core.GGUFFile.open(path)
    fp_bytes = sum(min(t[4], 16 * 1024) for t in g.tensors())
    out = {
        "what": "VideoIndex load (format 3: XXH64 per section + field validation), SmolLM2-135M index",
        "cpu": cpu_name(), "isa": "AVX2" if "avx2" in open("/proc/cpuinfo").read() else "other",
        "build": build_info(), "index_bytes": size, "n_chunks": n_chunks,
        "repeat": a.repeat, "results": res,
        "fingerprint": {"tensors": len(g.tensors()), "bytes_hashed": fp_bytes, "model_bytes": os.path.getsize(path)},
        "note": "medians of wall and process CPU seconds; page-cache warm; from_bytes copies the image (memcpy) "
                "then parses; the machine is shared (wall times noisy): compare the CPU times of one run",
    }
    write_json(a.out, out)
    for k, v in res.items():
        print(f"{k:40s} wall {v['wall_s'] * 1e3:8.2f} ms  cpu {v['cpu_s'] * 1e3:8.2f} ms  {v['GB_per_cpu_s']:6.2f} GB/cpu-s")
    print(f"index {size / 1e6:.1f} MB; fingerprint hashes {fp_bytes / 1e6:.2f} MB of {len(g.tensors())} tensors")


if __name__ == "__main__":
    main()
