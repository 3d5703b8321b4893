"""Benchmark: where the engine step's time goes, Read-ME against its dense source model.

    python -m readme_jax.bench.step_breakdown --model RUN_DIR [--out J.json]

Times one engine step (``Engine.time_step``: N padding tokens over one row, routed to one
expert: the full compute, nothing written) for N tokens and attention window W, on the run's
Read-ME model and on its dense source model (the same engine, a dense FFN), interleaved: every
repeat times every (model, N, W) in turn. Prints and writes the median ms of each. If the two
models cost the same, the experts are not what a step spends its time on. Nothing else may run
while it measures.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from readme_jax.checkpoints import load_model
from readme_jax.checkpoints.readme_io import dense_source, load_readme
from readme_jax.config import EngineConfig
from readme_jax.jsonfile import write_json
from readme_jax.model.readme_model import DenseModel
from readme_jax.serve.engine import Engine


def breakdown(engines: dict, tokens, windows, repeats: int) -> dict:
    """``{model: {"N=..": {"W=..": median ms}}}`` over ``repeats`` interleaved timed steps."""
    ts: dict = {}
    for _ in range(repeats):
        for name, eng in engines.items():
            for N in tokens:
                for W in windows:
                    t = eng.time_step(N, 1, np.zeros(N, np.int32), window=W, prompts=True)[0]
                    ts.setdefault(name, {}).setdefault(f"N={N}", {}).setdefault(f"W={W}", []).append(t)
    return {m: {n: {w: 1e3 * float(np.median(v)) for w, v in by_w.items()} for n, by_w in by_n.items()}
            for m, by_n in ts.items()}


def run(args) -> dict:
    model = load_readme(args.model)
    llama, _ = load_model(dense_source(args.model))
    cfg = EngineConfig(n_slots=16, max_len=max(args.windows), token_budget=max(args.tokens),
                       min_window=min(args.windows))
    engines = {"readme": Engine(model, cfg), "dense": Engine(DenseModel.from_module(llama), cfg)}
    med = breakdown(engines, args.tokens, args.windows, args.repeats)
    return {"command": "python -m readme_jax.bench.step_breakdown " + " ".join(args.argv),
            "machine": f"{platform.machine()}, 2-core CPU, jax CPU",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(args.model),
            "repeats": args.repeats, "median_ms": med}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder (its train/final and its dense source)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--windows", type=int, nargs="+", default=[32, 64, 128], help="powers of two of the smallest")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    res = run(args)
    for m, by_n in res["median_ms"].items():
        for n, by_w in by_n.items():
            print(m, n, " ".join(f"{w} {v:.1f} ms" for w, v in by_w.items()))
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
