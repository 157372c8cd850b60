"""Loopback load test of `x2l-edge serve`: N concurrent clients x Q questions against one video index.

Starts the real server (the shipped tiny VLM) on a free loopback port, indexes a generated needle video
through POST /v1/videos, then runs the clients (asyncio + httpx, each question streamed) and records:
every request's status (nothing may be lost, no 5xx), latency percentiles (to the first token and to the
end), throughput, and how many answers named the needle's word. Writes bench/results/server_load.json.

    python bench/server_load.py --clients 16 --questions 4 --frames 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402


def _pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client, url, body):
    t0 = time.perf_counter()
    first, text, status, usage, x2l = None, [], None, None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        status = r.status_code
        if status != 200:
            await r.aread()
            return {"status": status, "seconds": time.perf_counter() - t0, "error": r.text[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"status": "stream_error", "seconds": time.perf_counter() - t0, "error": ev["error"]}
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("x2l"):
                x2l = ev["x2l"]
            for c in ev.get("choices", []):
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - t0
                    text.append(piece)
    return {"status": status, "seconds": time.perf_counter() - t0, "first_token_s": first, "answer": "".join(text),
            "completion_tokens": (usage or {}).get("completion_tokens"),
            "chunks": [c["chunk"] for c in (x2l or {}).get("chunks", [])]}


async def _client(i, n_q, url, index_id, questions, max_tokens):
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for q in range(n_q):
            question = questions[(i + q) % len(questions)]
            body = {"model": "m", "stream": True, "temperature": 0, "max_tokens": max_tokens,
                    "stream_options": {"include_usage": True}, "x2l": {"top_k": 1},
                    "messages": [{"role": "user", "content": [{"type": "video_index", "video_index": {"id": index_id}},
                                                              {"type": "text", "text": question}]}]}
            res = await _one(client, url, body)
            res.update(client=i, question=question)
            out.append(res)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--questions", type=int, default=4, help="questions per client")
    ap.add_argument("--frames", type=int, default=60, help="needle video length (1 fps)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(bench_common.ROOT, "bench", "results", "server_load.json"))
    a = ap.parse_args()

    from x2l_edge import tiny_vlm as T
    from x2l_edge.video import write_video

    model = str(T.build_gguf())
    work = tempfile.mkdtemp(prefix="x2l-load-")
    media = os.path.join(work, "media")
    os.makedirs(media)
    vid = T.needle_video(1, a.frames)
    path = os.path.join(media, "needle.mkv")
    write_video(path, vid.frames, fps=1.0, codec="FFV1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "x2l_edge.server", model, "--port", str(port), "--media-dir", media,
                             "--max-queue", str(max(64, a.clients * 2)), "-t", str(a.threads)],
                            cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start (see " + log.name + ")")
            time.sleep(0.2)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/videos", json={"url": "file://" + path, "system": T.SYSTEM, "max_frames": a.frames},
                       timeout=60)
        index_id = r.json()["id"]
        while True:
            d = httpx.get(url + f"/v1/videos/{index_id}", timeout=60).json()
            if d["status"] in ("ready", "failed"):
                break
            time.sleep(0.2)
        if d["status"] != "ready":
            raise SystemExit(f"indexing failed: {d}")
        index_s = time.perf_counter() - t0
        questions = [T.QUESTIONS["word"], "What word is on the card?", "Which secret word is shown?",
                     "Tell me the secret word."]

        async def run_all():
            return await asyncio.gather(*[_client(i, a.questions, url, index_id, questions, a.max_tokens)
                                          for i in range(a.clients)])

        t1 = time.perf_counter()
        results = [r for per in asyncio.run(run_all()) for r in per]
        wall = time.perf_counter() - t1
        stats = httpx.get(url + "/v1/x2l/stats", timeout=10).json()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    ok = [r for r in results if r["status"] == 200]
    lat = [r["seconds"] for r in ok]
    ttft = [r["first_token_s"] for r in ok if r.get("first_token_s") is not None]
    toks = sum(r.get("completion_tokens") or 0 for r in ok)
    summary = {
        "what": "x2l-edge serve loopback load test (bench/server_load.py)",
        "command": " ".join([os.path.basename(sys.executable), "bench/server_load.py"] + sys.argv[1:]),
        "cpu": bench_common.cpu_name(), "isa": bench_common.isa_info(), "build": bench_common.build_info(),
        "model": os.path.basename(model), "threads": a.threads, "clients": a.clients,
        "questions_per_client": a.questions, "requests": len(results), "video_frames": a.frames,
        "chunks": len(d["chunks"]), "needle_chunk": vid.needle_chunk, "index_seconds": round(index_s, 2),
        "status_counts": {str(k): sum(1 for r in results if r["status"] == k) for k in {r["status"] for r in results}},
        "lost": a.clients * a.questions - len(results), "server_errors_5xx": sum(
            1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
        "wall_seconds": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
        "completion_tokens_per_s": round(toks / wall, 2),
        "latency_s": {f"p{p}": round(_pct(lat, p), 3) for p in (50, 90, 99)} | {"max": round(max(lat), 3)},
        "first_token_s": {f"p{p}": round(_pct(ttft, p), 3) for p in (50, 90, 99)},
        "answers_with_needle_word": sum(T.answer_ok(r["answer"], vid.word) for r in ok),
        "needle_chunk_selected": sum(r["chunks"] == [vid.needle_chunk] for r in ok),
        "server_stats": stats,
    }
    bench_common.write_json(a.out, {"summary": summary, "results": results})
    print(json.dumps({k: summary[k] for k in ("requests", "status_counts", "lost", "server_errors_5xx", "wall_seconds",
                                              "requests_per_s", "latency_s", "first_token_s",
                                              "answers_with_needle_word", "needle_chunk_selected")}, indent=1))
    if summary["lost"] or summary["server_errors_5xx"] or len(ok) != len(results):
        raise SystemExit("requests were lost or failed")


if __name__ == "__main__":
    main()
