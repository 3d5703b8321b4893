"""Load test of `readme-jax serve`: throughput and latency percentiles against client concurrency.

    python -m readme_jax.bench.server RUN_DIR [--concurrency 1 2 4 8] [--requests 16] [--max-tokens 32]

Starts the server (a subprocess on 127.0.0.1, the given slots and policy), warms it up, then for each
concurrency level keeps that many streaming clients (the official ``openai`` client) busy until
``--requests`` requests have finished. Measured per request on the client's wall clock: latency
(send to last token), time to first token, tokens received. Per level: completed requests, output
tokens per second (tokens sampled, from the server's counter), p50 / p95 latency and TTFT, requests
refused with 429. Each level is preceded by an unmeasured warm-up at the same concurrency, so the
engine's first-use compilations of that level's shapes are not in its numbers. Prompts are fixed
sentences (the same set at every level) so levels differ only in concurrency.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "In the beginning",
           "The meaning of the word", "To be or not to be", "import numpy as np", "Dear Sir,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, port: int, slots: int, policy: str, max_len: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "readme_jax.cli", "serve", str(path), "--port", str(port), "--slots", str(slots),
           "--policy", policy, "--max-len", str(max_len), "--max-queue", "1024"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start within 600 s")


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    try:
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True):
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                n += 1
    except openai.RateLimitError:
        return {"refused": True}
    t1 = time.perf_counter()
    return {"refused": False, "latency_s": t1 - t0, "ttft_s": (first or t1) - t0, "chunks": n}


def run_level(base: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=600, max_retries=0)
    usage = httpx.get(base + "/metrics").text
    tokens_before = _counter(usage, "readme_generated_tokens_total")
    compile_before = _counter(usage, "readme_engine_compile_seconds")
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        rows = list(ex.map(lambda i: one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens),
                           range(n_requests)))
    wall = time.perf_counter() - t0
    after = httpx.get(base + "/metrics").text
    tokens = _counter(after, "readme_generated_tokens_total") - tokens_before
    compile_s = _counter(after, "readme_engine_compile_seconds") - compile_before
    ok = [r for r in rows if not r["refused"]]
    lat = np.array([r["latency_s"] for r in ok])
    ttft = np.array([r["ttft_s"] for r in ok])
    return {"concurrency": concurrency, "requests": n_requests, "completed": len(ok),
            "refused_429": len(rows) - len(ok), "wall_s": wall, "compile_s_during_level": compile_s, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95))}


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="run folder or export to serve")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--policy", default="expert_aware")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    port = _free_port()
    log = Path(args.json or "bench_server").with_suffix(".server.log")
    proc = start_server(args.path, port, args.slots, args.policy, args.max_len, log)
    base = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        levels = []
        for c in args.concurrency:
            run_level(base, model, c, 2 * c, args.max_tokens)  # warm-up at this level: compiles its shapes
            levels.append(run_level(base, model, c, args.requests, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(120)
    res = {"command": "python -m readme_jax.bench.server " + " ".join(argv or sys.argv[1:]),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "model": model, "slots": args.slots,
           "policy": args.policy, "max_tokens": args.max_tokens, "levels": levels}
    print(f"{'conc':>5}{'done':>6}{'429':>5}{'tok/s':>9}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'ttft50':>8}{'ttft95':>8}"
          f"{'compile s':>10}")
    for r in levels:
        print(f"{r['concurrency']:>5}{r['completed']:>6}{r['refused_429']:>5}{r['output_tokens_per_s']:>9.1f}"
              f"{r['requests_per_s']:>8.2f}{r['latency_p50_s']:>8.2f}{r['latency_p95_s']:>8.2f}"
              f"{r['ttft_p50_s']:>8.2f}{r['ttft_p95_s']:>8.2f}{r['compile_s_during_level']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
