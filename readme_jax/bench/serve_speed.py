"""Serving speed, every path in one interleaved run: the step's floor, the engine, the served path
(``LLM``), the HTTP server (streaming, the official ``openai`` client) and Hugging Face transformers.

    python -m readme_jax.bench.serve_speed RUN_DIR [--tokens 64] [--rounds 3] [--out docs/results/serve_speed.json]

For the run's Read-ME model and its dense source model, at batch 1 (one prompt, ``--tokens`` new
tokens) and batch 8 (eight prompts at once, ``--tokens-b8`` each), greedy (EOS ends a request early
on every path alike: the same tokens are generated everywhere), tokens per second of:

* ``engine``: ``serve.engine.generate`` on an :class:`Engine` (prompt routing, chunks and decodes);
* ``served``: ``LLM.generate`` on text (tokenizer, live loop, detokenization with stop handling);
* ``http``: ``readme-jax serve`` in a subprocess, concurrency 1 and 8, streamed through the openai
  client (tokens counted by the server's ``readme_generated_tokens_total``);
* ``transformers``: ``AutoModelForCausalLM.generate`` on the same GGUF weights (the dense model,
  batch 1, float32), the external reference, at its faster torch thread count here (all cores or one).

Every round times every path once, in a rotated order (A, B, A, B ...), after an untimed warm-up
round that compiles every shape (compilation is never in a timed number; a shared persistent
compilation cache lets the server subprocesses reuse this process's programs). The floor of each
batch-8 engine decode step (bench/floor.py: bytes / copy bandwidth, FLOPs / matmul rate, both
measured in every round) gives ``step_over_floor_b8``. Reported: the median over rounds, ratios
taken per round (paired) then the median. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import openai

from readme_jax.bench.floor import StepCost, copy_bandwidth, matmul_rate
from readme_jax.checkpoints import embedded_gguf_path
from readme_jax.checkpoints.readme_io import dense_source
from readme_jax.jsonfile import write_json
from readme_jax.serve.api.http import wait_healthy
from readme_jax.serve.api.llm import LLM, open_model, serving_engine_config
from readme_jax.serve.engine import Engine
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig

PROMPT_B1 = "Once upon a time, in a small village by the sea, there lived"
PROMPTS_B8 = [
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "To be, or not to be, that is the question:",
    "In the beginning God created the heaven and the earth.",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(x):\n",
    "Of Man's first disobedience, and the fruit",
    "ABACUS, n. A frame with sliding beads,",
]
KEYS = ("served_b1_tok_s", "engine_b1_tok_s", "engine_b8_tok_s", "transformers_b1_tok_s", "http_c1_tok_s",
        "http_c8_tok_s", "readme_over_dense_b1_time", "step_over_floor_b8")


# ----------------------------------------------------------------------------- the paths


def engine_run(engine, prompts: list, n: int) -> dict:
    """``generate`` through a scheduler, timed, with each decode-only step's measured time and shape."""
    engine.reset()
    t0 = time.perf_counter()
    sched = Scheduler(SchedulerConfig(policy="fcfs", token_budget=engine.cfg.token_budget, n_slots=engine.cfg.n_slots,
                                      max_queue=len(prompts), n_experts=engine.model.n_experts, chunked_prefill=True))
    for i, p in enumerate(prompts):
        sched.add(engine.new_request(i, p, n))
    steps = []
    while sched.has_work():
        b = sched.next_batch()
        ctx = [it.request.prompt_len + it.request.n_generated - 1 for it in b.items]
        out = engine.step(b)
        sched.on_step_done(b, out.next_routes, 0.0)
        if not b.prefills:
            steps.append({"s": out.compute_s, "rows": len(b.items), "experts": max(1, len(out.experts)),
                          "ctx": ctx})
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(engine.output(i)) for i in range(len(prompts))), "seconds": seconds, "steps": steps,
            "outputs": [engine.output(i) for i in range(len(prompts))]}


def served_run(llm, texts: list, n: int) -> dict:
    t0 = time.perf_counter()
    out = llm.generate(texts, max_tokens=n)
    return {"tokens": sum(len(c.token_ids) for c in out), "seconds": time.perf_counter() - t0,
            "outputs": [c.token_ids for c in out]}


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def http_run(base: str, model: str, texts: list, n: int) -> dict:
    """Every text as one streaming request at once (concurrency = len(texts)); ``compile_s``: what the
    server spent compiling new shapes meanwhile (``readme_engine_compile_seconds``)."""
    compiled = _metric(base, "readme_engine_compile_seconds")
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=600, max_retries=0)

    def one(text):
        for _ in client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0, stream=True):
            pass

    before = _metric(base, "readme_generated_tokens_total")
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(texts)) as ex:
        list(ex.map(one, texts))
    seconds = time.perf_counter() - t0
    return {"tokens": int(_metric(base, "readme_generated_tokens_total") - before), "seconds": seconds,
            "compile_s": _metric(base, "readme_engine_compile_seconds") - compiled}


def measured(fn, engines: list, tries: int = 3) -> dict:
    """``fn()`` again while it compiled something (a new shape): a timed number never holds compilation."""
    for _ in range(tries):
        c0 = sum(e.compile_s for e in engines)
        r = fn()
        if r.get("compile_s", 0.0) == 0.0 and sum(e.compile_s for e in engines) == c0:
            return r
    r["compiled_during"] = True
    return r


def start_server(run_dir, dense: bool, slots: int, max_len: int, log: Path) -> tuple:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "readme_jax.cli", "serve", str(run_dir), "--port", str(port), "--slots", str(slots),
           "--max-len", str(max_len), "--max-queue", "64", "--no-warm", "--policy", "fcfs"] + (["--dense"] if dense else [])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, log, 600)
    return proc, base, httpx.get(base + "/v1/models").json()["data"][0]["id"]


def transformers_run(hf, ids: list, n: int, eos) -> dict:
    hf.torch.set_num_threads(hf.threads)
    x = hf.torch.as_tensor([ids], dtype=hf.torch.long)
    t0 = time.perf_counter()
    with hf.torch.no_grad():
        out = hf.model.generate(x, attention_mask=hf.torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return {"tokens": len(new), "seconds": time.perf_counter() - t0, "outputs": [new]}


def load_transformers(gguf_path):
    """``(torch, model)``: transformers' Llama on the GGUF's weights (float32, every core)."""
    import torch  # local import: torch/transformers are test extras, not runtime dependencies
    import transformers  # local import: as above

    p = Path(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return argparse.Namespace(torch=torch, model=model.eval(), threads=os.cpu_count() or 1)


def pick_threads(hf, ids: list, n: int, eos) -> int:
    """transformers' faster torch thread count here, every core or one (on a CPU shared with other
    work, torch's spinning OpenMP threads can run several times slower than one thread)."""
    best = {}
    for t in sorted({os.cpu_count() or 1, 1}):
        hf.threads = t
        transformers_run(hf, ids, 4, eos)
        r = transformers_run(hf, ids, n, eos)
        best[t] = r["seconds"] / max(r["tokens"], 1)
    hf.threads = min(best, key=best.get)
    return hf.threads


# ----------------------------------------------------------------------------- the run


def run(args) -> dict:
    log = print if not args.quiet else (lambda *a, **k: None)
    n = args.tokens
    models, tok = {}, None
    for name, dense in (("readme", False), ("dense", True)):
        models[name], tok, _ = open_model(args.run_dir, dense=dense)
    cfg = serving_engine_config(args.slots, args.max_len, tok.eos_id)
    ids_b1 = [tok.encode(PROMPT_B1)]
    ids_b8 = [tok.encode(t) for t in PROMPTS_B8]
    engines = {m: Engine(models[m], cfg) for m in models}
    llms = {m: LLM(models[m], tok, cfg, policy="fcfs") for m in models}
    costs = {m: StepCost.of(models[m]) for m in models}
    servers, hf = {}, None
    tmp = Path(tempfile.mkdtemp(prefix="serve_speed_"))
    try:
        if not args.no_http:
            for m in models:
                servers[m] = start_server(args.run_dir, m == "dense", args.slots, args.max_len, tmp / f"{m}.log")
                log(f"[serve_speed] {m} server on {servers[m][1]}")
        if not args.no_transformers:
            src = dense_source(args.run_dir)
            src = embedded_gguf_path() if str(src) == "embedded" else src
            hf = load_transformers(src) if str(src).endswith(".gguf") else None
            if hf is None:
                log(f"[serve_speed] transformers skipped: the dense source {src} is not a GGUF file")
            else:
                log(f"[serve_speed] transformers: {pick_threads(hf, ids_b1[0], n, tok.eos_id)} torch threads")
        tasks = []  # (name, fn): one timed measurement each
        for m in models:
            n8 = args.tokens_b8
            tasks += [(f"engine_b1_{m}", lambda m=m: engine_run(engines[m], ids_b1, n)),
                      (f"engine_b8_{m}", lambda m=m: engine_run(engines[m], ids_b8, n8)),
                      (f"served_b1_{m}", lambda m=m: served_run(llms[m], [PROMPT_B1], n)),
                      (f"served_b8_{m}", lambda m=m: served_run(llms[m], PROMPTS_B8, n8))]
            if m in servers:
                _, base, name = servers[m]
                tasks += [(f"http_c1_{m}", lambda base=base, name=name: http_run(base, name, [PROMPT_B1], n)),
                          (f"http_c8_{m}", lambda base=base, name=name: http_run(base, name, PROMPTS_B8, n8))]
        if hf is not None:
            tasks.append(("transformers_b1_dense", lambda: transformers_run(hf, ids_b1[0], n, tok.eos_id)))
        all_engines = list(engines.values()) + [llm.engine for llm in llms.values()]
        t0 = time.perf_counter()
        for name, fn in tasks:  # warm-up: compiles every shape the rounds meet
            fn()
        log(f"[serve_speed] warm-up round {time.perf_counter() - t0:.0f} s "
            f"(compiled {sum(len(e._compiled) for e in engines.values())} programs in "
            f"{sum(e.compile_s for e in engines.values()):.0f} s)")
        rounds = []
        for r in range(args.rounds):
            order = tasks[r % len(tasks):] + tasks[:r % len(tasks)]
            rec = {"copy_bytes_per_s": copy_bandwidth(), "matmul_flop_per_s": matmul_rate()}
            for name, fn in order:
                rec[name] = measured(fn, all_engines)
            rounds.append(rec)
            log(f"[serve_speed] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['tokens'] / v['seconds']:.1f}" for k, v in rec.items() if isinstance(v, dict)))
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(120)
    return summarize(rounds, costs, args, tasks)


def summarize(rounds: list, costs: dict, args, tasks) -> dict:
    """Medians over rounds; ratios per round, then the median."""
    def tok_s(r, name):
        return r[name]["tokens"] / r[name]["seconds"]

    names = [t for t, _ in tasks]
    med = {name: float(np.median([tok_s(r, name) for r in rounds])) for name in names}
    floors = {}
    for m, cost in costs.items():
        ratios, parts = [], []
        for r in rounds:
            for st in r[f"engine_b8_{m}"]["steps"]:
                if st["rows"] != 8:
                    continue
                f = cost.floor_s(r["copy_bytes_per_s"], r["matmul_flop_per_s"], n_experts=st["experts"],
                                 n_tokens=st["rows"], n_rows=st["rows"], positions=sum(st["ctx"]),
                                 attended=sum(c + 1 for c in st["ctx"]))
                ratios.append(st["s"] / f["floor_s"])
                parts.append((st["s"], f["memory_s"], f["compute_s"], st["experts"]))
        p = np.array(parts) if parts else np.zeros((0, 4))
        floors[m] = {"step_over_floor_b8": float(np.median(ratios)) if ratios else None,
                     "step_ms_median": 1e3 * float(np.median(p[:, 0])) if parts else None,
                     "floor_memory_ms_median": 1e3 * float(np.median(p[:, 1])) if parts else None,
                     "floor_compute_ms_median": 1e3 * float(np.median(p[:, 2])) if parts else None,
                     "experts_per_step_mean": float(p[:, 3].mean()) if parts else None, "steps": len(parts)}

    def paired(a, b):  # per round: tokens/s of b over tokens/s of a (= time of a over time of b); the median
        return float(np.median([tok_s(r, b) / tok_s(r, a) for r in rounds])) if a in names and b in names else None

    out = {
        "served_b1_tok_s": med["served_b1_readme"], "engine_b1_tok_s": med["engine_b1_readme"],
        "engine_b8_tok_s": med["engine_b8_readme"], "transformers_b1_tok_s": med.get("transformers_b1_dense"),
        "http_c1_tok_s": med.get("http_c1_readme"), "http_c8_tok_s": med.get("http_c8_readme"),
        "readme_over_dense_b1_time": paired("served_b1_readme", "served_b1_dense"),
        "step_over_floor_b8": floors["readme"]["step_over_floor_b8"],
    }
    out["ratios"] = {  # tokens/s of the first over the second, paired per round (time ratios say so)
        "served_b1_over_engine_b1": paired("engine_b1_readme", "served_b1_readme"),
        "served_b1_over_transformers_b1": paired("transformers_b1_dense", "served_b1_readme"),
        "http_c8_over_engine_b8": paired("engine_b8_readme", "http_c8_readme"),
        "http_c1_over_engine_b1": paired("engine_b1_readme", "http_c1_readme"),
        "served_b8_over_engine_b8": paired("engine_b8_readme", "served_b8_readme"),
        "readme_over_dense_engine_b1_time": paired("engine_b1_readme", "engine_b1_dense"),
        "readme_over_dense_engine_b8_time": paired("engine_b8_readme", "engine_b8_dense"),
        "readme_over_dense_served_b8_time": paired("served_b8_readme", "served_b8_dense"),
    }
    out["tok_s_median"] = med
    out["floor_b8"] = floors
    out["floor_measured"] = {"copy_bytes_per_s_median": float(np.median([r["copy_bytes_per_s"] for r in rounds])),
                             "matmul_flop_per_s_median": float(np.median([r["matmul_flop_per_s"] for r in rounds]))}
    same = {}
    for m in costs:
        for b in ("b1", "b8"):
            a = rounds[0].get(f"engine_{b}_{m}", {}).get("outputs")
            s = rounds[0].get(f"served_{b}_{m}", {}).get("outputs")
            if a is not None and s is not None:
                same[f"engine_equals_served_{b}_{m}"] = a == s
    if "transformers_b1_dense" in names:
        same["transformers_equals_engine_b1_dense"] = (rounds[0]["transformers_b1_dense"]["outputs"]
                                                        == rounds[0]["engine_b1_dense"]["outputs"])
    out["same_tokens"] = same
    out["tokens_generated"] = {name: rounds[0][name]["tokens"] for name in names}
    out["settings"] = {"tokens": args.tokens, "tokens_b8": args.tokens_b8, "rounds": args.rounds, "slots": args.slots, "max_len": args.max_len,
                       "prompt_b1": PROMPT_B1, "prompts_b8": PROMPTS_B8, "policy": "fcfs", "greedy": True}
    out["per_round_tok_s"] = [{k: v["tokens"] / v["seconds"] for k, v in r.items() if isinstance(v, dict)}
                              for r in rounds]
    return out


def print_table(res: dict) -> None:
    med = res["tok_s_median"]
    print(f"{'path':<14}{'Read-ME tok/s':>15}{'dense tok/s':>13}")
    for p in ("engine_b1", "served_b1", "http_c1", "engine_b8", "served_b8", "http_c8", "transformers_b1"):
        a, b = med.get(f"{p}_readme"), med.get(f"{p}_dense")
        print(f"{p:<14}{'' if a is None else f'{a:.1f}':>15}{'' if b is None else f'{b:.1f}':>13}")
    for k in KEYS:
        v = res.get(k)
        print(f"{k:<28}{'n/a' if v is None else f'{v:.3f}'}")
    for k, v in res["ratios"].items():
        print(f"{k:<36}{'n/a' if v is None else f'{v:.3f}'}")
    f = res["floor_b8"]["readme"]
    if f["steps"]:
        print(f"b8 decode step (Read-ME): {f['step_ms_median']:.1f} ms, floor memory {f['floor_memory_ms_median']:.1f} "
              f"ms / compute {f['floor_compute_ms_median']:.1f} ms, {f['experts_per_step_mean']:.2f} experts per step")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished run folder (its trained Read-ME and its dense source model)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request at batch 1 (EOS may end one earlier)")
    ap.add_argument("--tokens-b8", type=int, default=32, help="new tokens per request at batch 8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("docs/results/serve_speed.json"))
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP server")
    ap.add_argument("--no-transformers", action="store_true", help="skip Hugging Face transformers")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    # this process and the server subprocesses share compiled programs (a fresh cache: nothing stale)
    cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="serve_speed_jaxcache_"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t0 = time.perf_counter()
    res = run(args)
    res = {"command": "python -m readme_jax.bench.serve_speed " + " ".join(argv),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}, "
                      f"jax {jax.__version__} on {jax.devices()[0].platform}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - t0, **res}
    print_table(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
