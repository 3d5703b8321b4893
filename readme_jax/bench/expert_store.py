"""Benchmark: the real expert store on a trained Read-ME model, measured with real copies.

    python -m readme_jax.bench.expert_store --model RUN_DIR [--capacities 2 3 5] [--seeds 0 1 2 3 4]

For every workload seed and pool capacity, the same closed workload (``--requests`` prompts
from the held-out text of every domain, all queued at time 0, ``--slots`` KV slots, the
``expert_aware`` scheduler with token budget ``--budget``) is served by the JAX engine with an
:class:`ExpertStore` under each store policy, in an order rotated per seed:

* ``lru_on_demand``, ``random_on_demand``, ``belady_on_demand``: copies start when a call needs them;
* ``belady_prefetch``, ``lru_prefetch``: the next call's experts (rest of the step, then the
  scheduler's lookahead) are copied while the current call computes; one pool slot is kept
  for the incoming copy. ``lru_prefetch`` is the control that separates prefetching from
  Belady's eviction choice.

A step is one engine call when its experts fit the pool, else calls packed resident-first
(serve/engine/calls.py); prompts run in chunks of the budget.

Measured per run: ``stall_seconds`` (time the engine waited for expert copies before calls),
``compute_seconds`` (the calls themselves), hit ratio, loads. Every run's tokens are checked
equal to the all-resident run (capacity = n_experts) of the same seed. Prints the table and
writes JSON (``--out``). Nothing else may run on the machine while it measures.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from readme_jax.checkpoints.readme_io import load_readme
from readme_jax.eval.spread import t_interval
from readme_jax.jsonfile import write_json
from readme_jax.config import EngineConfig
from readme_jax.serve.sim.bench import _embedded_tokenizer, corpus_prompt_fn
from readme_jax.serve.engine import Engine
from readme_jax.serve.engine.expert_store import ExpertStore
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig

POLICIES = {"lru_on_demand": ("lru", False), "random_on_demand": ("random", False),
            "belady_on_demand": ("belady", False), "belady_prefetch": ("belady", True),
            "lru_prefetch": ("lru", True)}


def workload(prompt_fn, n: int, seed: int, prompt_range=(8, 32), output_range=(8, 32)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = prompt_fn(int(rng.integers(prompt_range[0], prompt_range[1] + 1)), int(seed * 100_003 + i))
        out.append((i, p, int(rng.integers(output_range[0], output_range[1] + 1))))
    return out


def serve(engine: Engine, work, *, budget: int, slots: int, lookahead_steps: int) -> dict:
    """Serve ``work`` to the end; measured seconds (compilation excluded) and every output."""
    engine.reset()
    E = engine.model.n_experts
    sched = Scheduler(SchedulerConfig(policy="expert_aware", token_budget=budget, n_slots=slots,
                                      max_queue=len(work), n_experts=E, chunked_prefill=True))
    engine.lookahead = lambda: sched.lookahead(lookahead_steps)
    for rid, prompt, n_out in work:
        sched.add(engine.new_request(rid, prompt, n_out))
    compute = stall = 0.0
    steps = 0
    while sched.has_work():
        b = sched.next_batch()
        out = engine.step(b)
        sched.on_step_done(b, out.next_routes, 0.0)
        compute += out.compute_s
        stall += out.stall_s
        steps += 1
    return {"compute_seconds": compute, "stall_seconds": stall, "steps": steps,
            "outputs": {rid: engine.output(rid) for rid, _, _ in work}}


def run(args) -> dict:
    model = load_readme(args.model)
    tok = _embedded_tokenizer()
    prompt_fn, _ = corpus_prompt_fn(tok)
    E = model.n_experts
    ecfg = EngineConfig(n_slots=args.slots, max_len=args.max_len, token_budget=args.budget)
    rows = []
    policies = list(POLICIES)
    for si, seed in enumerate(args.seeds):
        work = workload(prompt_fn, args.requests, seed)
        ref_store = ExpertStore(model, E, "lru")
        ref = serve(Engine(model, ecfg, store=ref_store), work, budget=args.budget,
                    slots=args.slots, lookahead_steps=args.lookahead)
        for cap in args.capacities:
            order = policies[si % len(policies):] + policies[:si % len(policies)]
            for name in order:
                policy, prefetch = POLICIES[name]
                store = ExpertStore(model, cap, policy, prefetch=prefetch, seed=seed)
                r = serve(Engine(model, ecfg, store=store), work, budget=args.budget, slots=args.slots,
                          lookahead_steps=args.lookahead)
                st, cs = store.stats, store.cache.stats
                row = {"seed": seed, "capacity": cap, "policy": name, "stall_seconds": r["stall_seconds"],
                       "compute_seconds": r["compute_seconds"], "hit_ratio": cs.hit_ratio, "hits": cs.hits,
                       "misses": cs.misses, "demand_loads": st.demand_loads, "prefetch_loads": st.prefetch_loads,
                       "transient_loads": st.transient_loads, "calls": st.calls, "steps": r["steps"],
                       "outputs_equal_all_resident": r["outputs"] == ref["outputs"]}
                rows.append(row)
                print(f"seed {seed} C={cap} {name:17s} stall {row['stall_seconds']:.3f}s compute "
                      f"{row['compute_seconds']:.2f}s hit {row['hit_ratio']:.3f} loads d{st.demand_loads} "
                      f"p{st.prefetch_loads} t{st.transient_loads} calls {st.calls} equal {row['outputs_equal_all_resident']}",
                      flush=True)
    summary: dict = {}
    for cap in args.capacities:
        summary[str(cap)] = {}
        for name in policies:
            rs = [r for r in rows if r["capacity"] == cap and r["policy"] == name]
            summary[str(cap)][name] = {
                "stall_seconds": t_interval([r["stall_seconds"] for r in rs]),
                "compute_seconds": t_interval([r["compute_seconds"] for r in rs]),
                "total_seconds": t_interval([r["stall_seconds"] + r["compute_seconds"] for r in rs]),
                "hit_ratio": t_interval([r["hit_ratio"] for r in rs])}
        lru = {r["seed"]: r["stall_seconds"] for r in rows if r["capacity"] == cap and r["policy"] == "lru_on_demand"}
        bp = {r["seed"]: r["stall_seconds"] for r in rows if r["capacity"] == cap and r["policy"] == "belady_prefetch"}
        summary[str(cap)]["stall_ratio_belady_prefetch_vs_lru_on_demand"] = t_interval([bp[s] / lru[s] for s in lru])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return {"command": "python -m readme_jax.bench.expert_store " + " ".join(args.argv),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, jax CPU", "date": stamp,
            "model": str(args.model), "engine": "one call per step",
            "n_experts": E, "expert_bytes": ref_store.expert_bytes,
            "workload": {"requests": args.requests, "slots": args.slots, "token_budget": args.budget,
                         "prompt_tokens": [8, 32], "output_tokens": [8, 32], "scheduler": "expert_aware",
                         "lookahead_steps": args.lookahead, "source": "held-out text of every domain"},
            "all_outputs_equal_all_resident": all(r["outputs_equal_all_resident"] for r in rows),
            "summary": summary, "runs": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder (its train/final) or a Read-ME export")
    p.add_argument("--capacities", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--max-len", type=int, default=72)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    res = run(args)
    for cap, s in res["summary"].items():
        for name, v in s.items():
            if name.startswith("stall_ratio"):
                print(f"C={cap} {name}: {v['mean']:.3f} [{v['ci95_low']:.3f}, {v['ci95_high']:.3f}]")
            else:
                print(f"C={cap} {name:17s} stall {v['stall_seconds']['mean']:.3f}s total {v['total_seconds']['mean']:.2f}s "
                      f"hit {v['hit_ratio']['mean']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)


if __name__ == "__main__":
    main()
