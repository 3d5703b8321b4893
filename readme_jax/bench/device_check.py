"""The prepared device check of the expert FFN: one run on a lent H100/H200 (or a CPU dry run).

    python -m readme_jax.bench.device_check --out DIR [--shapes smollm2,llama2_7b]
        [--tokens 8,4096] [--dtypes bf16,f32] [--quick] [--budget-s 420]

Writes ``DIR/device_check.json`` (everything) and ``DIR/device_check.md`` (the tables), rewritten
after every task, so a run stopped early still leaves what it measured. Sections (run in the
order peaks, correctness, perf of the first dtype, its sweep, perf of the other dtypes):

1. ``peaks``: this device's copy bandwidth (``a * 2`` over a large array, bytes read + written)
   and bf16 matmul rate (random ``n x n`` operands), each the best of several timed repeats after
   a warm-up, blocked on with ``block_until_ready``.
2. ``correctness``: ``impl="pallas"`` against ``impl="reference"`` on float32 copies of the same
   (rounded) inputs, forward and ``jax.vjp`` gradients (x, wg, wu, wd), E=7 experts with empty
   experts, dropped tokens (id -1) and ragged group sizes; dropped rows must be exactly 0.
   float32 cases run under ``jax.default_matmul_precision("highest")`` (the kernel sets its own
   precision; this keeps XLA's default f32 precision, which can be TF32 on a GPU, out of the reference
   and of the XLA backward).
3. ``perf``: decode / prefill at each ``--tokens`` T for ``pallas``, ``ragged_dot x3`` (sort +
   three ``lax.ragged_dot`` + unsort) and ``xla``, cycling through >= 4 distinct weight sets of
   > 200 MB together (more than an H100/H200 L2), so every call reads its weights from HBM.
   GB/s = bytes of the touched experts' weights (3 D F each) / time; TFLOP/s = 6 T D F / time;
   both also as fractions of the measured peaks; ``x_vs_ragged`` = ragged time / method time.
4. ``sweep``: 2-4 block-size configurations (``kernels.block_sizes.choose`` and neighbours, see
   ``sweep_configs``).

A time budget (``--budget-s``) is checked before each task; tasks that would not fit are listed
under ``skipped`` instead of run. A task that raises (a failed compile, say) is listed under
``errors`` and the run goes on; the exit status is 1 unless every correctness check passed. ``--quick`` uses tiny shapes (on CPU the kernel runs in interpret
mode): a dry run whose numbers are NOT results (``"dry_run": true`` in the JSON).
Imports only jax, numpy and the kernel layers (no gguf, grain, tokenizers): the lent GPU image
lacks some of those.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.errors import ShapeError
from readme_jax.kernels import block_sizes as bsz
from readme_jax.kernels.expert_ffn_pallas import platform
from readme_jax.kernels.xla_tiles import xla_ffn_ragged
from readme_jax.ops.expert_ffn import expert_ffn

E = 7
SHAPES = {"smollm2": (576, 768), "llama2_7b": (4096, 5504), "tiny": (64, 96)}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
TOL = {"bf16": {"fwd": 1e-2, "grad": 2e-2}, "f32": {"fwd": 1e-4, "grad": 1e-4}}
ROTATE_BYTES = 256 * 2**20  # weight sets cycled in timing: > 200 MB, several times a 50-60 MB L2
CHECK_T = 45  # correctness: ragged tails for every tm in the tables (45 = 16 + 16 + 13)


class Budget:
    """Wall-clock guard: ``fits(need_s)`` is False once fewer than ``need_s`` seconds remain."""

    def __init__(self, total_s: float):
        self.t0, self.total_s = time.perf_counter(), total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, need_s: float) -> bool:
        return self.elapsed() + need_s <= self.total_s


def best_time(fn, arg_sets, *, repeats: int, target_s: float) -> float:
    """Best seconds per call: warm-up over every arg set, then ``repeats`` timed passes, each
    ``inner`` calls issued back to back (cycling the arg sets) and blocked on once."""
    out = None
    for a in arg_sets:
        out = fn(*a)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = max(time.perf_counter() - t0, 1e-6)
    inner = int(min(max(target_s / one, len(arg_sets)), 200))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_peaks(quick: bool) -> dict:
    n_copy = 2**22 if quick else 2**29  # bf16 elements: 8 MiB dry run, 1 GiB on a device
    a = jax.random.normal(jax.random.key(1), (n_copy,), jnp.bfloat16)
    t = best_time(jax.jit(lambda v: v * 2), [(a,)], repeats=5, target_s=0.05)
    copy = 2 * a.size * 2 / t / 1e9
    del a
    m = 512 if quick else 8192
    k = jax.random.split(jax.random.key(2))
    ab = [jax.random.normal(kk, (m, m), jnp.bfloat16) for kk in k]
    t = best_time(jax.jit(jnp.dot), [tuple(ab)], repeats=5, target_s=0.05)
    return {"copy_GBps": copy, "copy_bytes_read_plus_written": 4 * n_copy, "copy_op": "a * 2 (bf16)",
            "matmul_TFLOPs": 2 * m**3 / t / 1e12, "matmul_n": m, "matmul_dtype": "bfloat16"}


def weights(key, D, F, dtype, n_sets: int = 1):
    out = []
    for k in jax.random.split(key, n_sets):
        kg, ku, kd = jax.random.split(k, 3)
        out.append(((jax.random.normal(kg, (E, D, F), jnp.float32) / np.sqrt(D)).astype(dtype),
                    (jax.random.normal(ku, (E, D, F), jnp.float32) / np.sqrt(D)).astype(dtype),
                    (jax.random.normal(kd, (E, F, D), jnp.float32) / np.sqrt(F)).astype(dtype)))
    return out


def check_ids(T: int, seed: int) -> np.ndarray:
    """Experts 1, 4, 6 empty; ragged groups over 0, 2, 3, 5; about 10 % dropped (-1)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice([0, 2, 3, 5], size=T, p=[0.5, 0.3, 0.15, 0.05]).astype(np.int32)
    ids[rng.random(T) < 0.1] = -1
    ids[0], ids[-1], ids[T // 2] = -1, 5, 3
    return ids


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_correctness(shape: str, dtype_name: str, seed: int) -> list[dict]:
    D, F = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    ids = jnp.asarray(check_ids(CHECK_T, seed))
    kx, kc, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (CHECK_T, D), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (CHECK_T, D), jnp.float32).astype(dtype)
    w = weights(kw, D, F, dtype)[0]

    def fwd_vjp(impl):
        def f(x, e, ct, wg, wu, wd):
            y, pull = jax.vjp(lambda *a: expert_ffn(a[0], e, *a[1:], impl=impl), x, wg, wu, wd)
            return y, pull(ct)
        return jax.jit(f)

    prec = "highest" if dtype_name == "f32" else None
    with jax.default_matmul_precision(prec):
        y, grads = fwd_vjp("pallas")(x, ids, ct, *w)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        y_ref, grads_ref = fwd_vjp("reference")(f32(x), ids, f32(ct), *map(f32, w))
    dropped = np.asarray(ids) < 0
    base = dict(shape=shape, dtype=dtype_name, T=CHECK_T, D=D, F=F, E=E,
                empty_experts=[1, 4, 6], dropped_tokens=int(dropped.sum()),
                matmul_precision=prec or "default")
    rows = [dict(base, check="fwd", rel_err=_rel(y, y_ref), tol=TOL[dtype_name]["fwd"],
                 dropped_rows_zero=bool(np.all(np.asarray(y)[dropped] == 0)))]
    for name, g, g_ref in zip(("dx", "dwg", "dwu", "dwd"), grads, grads_ref):
        extra = {"dropped_rows_zero": bool(np.all(np.asarray(g)[dropped] == 0))} if name == "dx" else {}
        rows.append(dict(base, check=f"grad {name}", rel_err=_rel(g, g_ref), tol=TOL[dtype_name]["grad"], **extra))
    for r in rows:
        r["pass"] = bool(r["rel_err"] <= r["tol"] and r.get("dropped_rows_zero", True))
    return rows


def method_fns() -> dict:
    return {"pallas": jax.jit(lambda x, e, *w: expert_ffn(x, e, *w, impl="pallas")),
            "ragged_dot x3": jax.jit(xla_ffn_ragged),
            "xla": jax.jit(lambda x, e, *w: expert_ffn(x, e, *w, impl="xla"))}


def perf_ids(T: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, E, size=T).astype(np.int32)


def time_case(fn, x, ids, wsets, quick: bool) -> float:
    return best_time(fn, [(x, ids, *w) for w in wsets], repeats=3 if quick else 5,
                     target_s=0.01 if quick else 0.05)


def perf_rows(shape, dtype_name, T, wsets, peaks, fns, quick, block_sizes=None,
              ragged_s: float | None = None) -> list[dict]:
    """One row per method; ``ragged_s`` (the ragged_dot x3 time of the same case) when that
    method is not among ``fns`` (the sweep)."""
    D, F = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    ids_np = perf_ids(T, T)
    ids, uniq = jnp.asarray(ids_np), len(np.unique(ids_np))
    x = jax.random.normal(jax.random.key(T), (T, D), jnp.float32).astype(dtype)
    wbytes = uniq * 3 * D * F * jnp.dtype(dtype).itemsize
    flops = 6 * T * D * F
    times, outs = {}, {}
    for name, fn in fns.items():
        times[name] = time_case(fn, x, ids, wsets, quick)
        outs[name] = fn(x, ids, *wsets[0])
    rows = []
    for name, t in times.items():
        r = dict(shape=shape, dtype=dtype_name, phase="decode" if T <= 256 else "prefill", T=T,
                 unique_experts=uniq, method=name, weight_sets=len(wsets), ms=t * 1e3,
                 weight_GBps=wbytes / t / 1e9, TFLOPs=flops / t / 1e12,
                 frac_copy_bw=wbytes / t / 1e9 / peaks["copy_GBps"],
                 frac_matmul=flops / t / 1e12 / peaks["matmul_TFLOPs"],
                 x_vs_ragged=times.get("ragged_dot x3", ragged_s or float("nan")) / t,
                 rel_diff_vs_xla=_rel(outs[name], outs["xla"]) if "xla" in outs else None)
        if name == "pallas":  # the table's choice unless the sweep passed its own
            bs = block_sizes or bsz.choose(platform(), T, E, D, F, jnp.dtype(dtype).itemsize)
            r["block_sizes"] = dataclasses.asdict(bs)
        rows.append(r)
    return rows


def ragged_time(perf: list[dict], shape: str, dtype_name: str, T: int) -> float | None:
    return next((r["ms"] / 1e3 for r in perf if (r["shape"], r["dtype"], r["T"], r["method"])
                 == (shape, dtype_name, T, "ragged_dot x3")), None)


def sweep_configs(T: int, D: int, F: int, itemsize: int, limit: int = 4, backend: str | None = None) -> list:
    """The table's choice and the first up-to-3 neighbours (bf x2, bf /2, tm /2 or x2, bf /4) that validate."""
    backend = backend or platform()
    kernel = "gpu" if backend == "gpu" else "tpu"
    base = bsz.choose(backend, T, E, D, F, itemsize)
    tm_min = bsz.TABLE[backend]["tm_min"]
    cands = [base, dataclasses.replace(base, bf=base.bf * 2), dataclasses.replace(base, bf=base.bf // 2),
             dataclasses.replace(base, tm=base.tm // 2 if base.tm >= 2 * tm_min else base.tm * 2),
             dataclasses.replace(base, bf=base.bf // 4)]
    out = []
    for c in cands:
        if c in out or c.bf < 16 or (backend == "gpu" and c.bf & (c.bf - 1)):
            continue
        try:
            bsz.validate(c, kernel, D, F)
        except ShapeError:
            continue
        out.append(c)
    return out[:limit]


# --------------------------------------------------------------------------- report


def write_report(res: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "device_check.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(out_dir, "device_check.md"), "w") as fh:
        fh.write(format_tables(res) + "\n")


def format_tables(res: dict) -> str:
    head = (f"# Device check: {res['device']} (platform {res['platform']}, jax {res['jax']}, "
            f"{res['date']})\n")
    if res["dry_run"]:
        head += "\n**CPU dry run (interpret mode, tiny shapes): these numbers are NOT results.**\n"
    p = res.get("peaks")
    if p:
        head += (f"\nMeasured peaks: copy {p['copy_GBps']:.1f} GB/s ({p['copy_op']}, read + written), "
                 f"matmul {p['matmul_TFLOPs']:.2f} TFLOP/s (bf16 {p['matmul_n']}^3)\n")
    lines = [head, "## Correctness (pallas vs float32 reference)\n",
             "| shape | dtype | check | rel err | tol | dropped rows 0 | pass |", "|---|---|---|---:|---:|---|---|"]
    for r in res["correctness"]:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['check']} | {r['rel_err']:.2e} | {r['tol']:.0e} "
                     f"| {r.get('dropped_rows_zero', '-')} | {r['pass']} |")
    for title, key in (("Performance", "perf"), ("Block-size sweep (pallas)", "sweep")):
        lines += [f"\n## {title}\n", "| shape | dtype | T | uniq | method | blocks | ms | weight GB/s "
                  "| TFLOP/s | % copy BW | % matmul | x vs ragged_dot x3 |",
                  "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in res[key]:
            b = r.get("block_sizes")
            blocks = f"tm={b['tm']} bf={b['bf']}" if b else "-"
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['T']} | {r['unique_experts']} | {r['method']} "
                         f"| {blocks} | {r['ms']:.3f} | {r['weight_GBps']:.1f} | {r['TFLOPs']:.3f} "
                         f"| {100 * r['frac_copy_bw']:.1f} | {100 * r['frac_matmul']:.1f} "
                         f"| {r['x_vs_ragged']:.2f} |")
    if res["skipped"]:
        lines += ["\n## Skipped (time budget)\n"] + [f"- {s}" for s in res["skipped"]]
    if res["errors"]:
        lines += ["\n## Errors\n"] + [f"- {e['task']}: {e['error'][:300]}" for e in res["errors"]]
    lines.append(f"\nWall time {res['wall_s']:.1f} s of a {res['budget_s']:.0f} s budget; "
                 f"all correctness checks pass: {res['all_correct']}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run(args) -> dict:
    budget = Budget(args.budget_s)
    dev = jax.devices()[0]
    shapes = ["tiny"] if args.quick else args.shapes
    res = dict(device=f"{dev.platform}: {dev.device_kind}", platform=jax.default_backend(),
               dry_run=jax.default_backend() == "cpu", quick=args.quick, jax=jax.__version__,
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), num_experts=E,
               shapes={s: SHAPES[s] for s in shapes}, tokens=args.tokens, dtypes=args.dtypes,
               budget_s=args.budget_s, peaks=None, correctness=[], perf=[], sweep=[], skipped=[],
               errors=[], all_correct=None, wall_s=0.0)
    if res["dry_run"]:
        res["note"] = "CPU dry run: the kernel runs in interpret mode; timings are not results"

    def done():
        res["wall_s"] = budget.elapsed()
        res["all_correct"] = (bool(res["correctness"]) and all(r["pass"] for r in res["correctness"])
                              and not any(e["task"].startswith("correctness") for e in res["errors"]))
        write_report(res, args.out)

    def step(label, need_s, fn):
        if not budget.fits(need_s):
            res["skipped"].append(f"{label} (needs ~{need_s:.0f} s, {budget.total_s - budget.elapsed():.0f} s left)")
            print(f"[device_check] skip {label}", file=sys.stderr)
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001  a failed compile or launch: record it, go on
            res["errors"].append({"task": label, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"[device_check] FAILED {label}: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"[device_check] {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        done()

    small = lambda s: 5 if s in ("tiny", "smollm2") else 15  # noqa: E731  rough seconds per task

    step("peaks", 10, lambda: res.update(peaks=measure_peaks(args.quick)))
    if res["peaks"] is None:
        res["skipped"].append("everything after peaks (no peaks to compare against)")
        done()
        return res
    for s in shapes:
        for dt in args.dtypes:
            step(f"correctness {s} {dt}", small(s) * 2,
                 lambda s=s, dt=dt: res["correctness"].extend(check_correctness(s, dt, seed=len(res["correctness"]))))
    fns = method_fns()
    # priority: perf of the first dtype (both shapes), its block sweep, then the other dtypes' perf
    phases = [("perf", args.dtypes[0]), ("sweep", args.dtypes[0])] + [("perf", d) for d in args.dtypes[1:]]
    for phase, dt in phases:
        for s in shapes:
            D, F = SHAPES[s]
            itemsize = jnp.dtype(DTYPES[dt]).itemsize
            n_sets = max(4, -(-ROTATE_BYTES // (3 * E * D * F * itemsize)))
            todo = []  # (label, fns, block sizes or None, T)
            for T in args.tokens:
                if phase == "perf":
                    todo.append((f"perf {s} {dt} T={T}", fns, None, T))
                    continue
                for bs in sweep_configs(T, D, F, itemsize, limit=2 if args.quick else 4):
                    table = [dict(r, block_sizes=dataclasses.asdict(bs)) for r in res["perf"]
                             if (r["shape"], r["dtype"], r["T"], r["method"]) == (s, dt, T, "pallas")
                             and r.get("block_sizes") == dataclasses.asdict(bs)]
                    if table:  # the table's choice was timed in perf already
                        res["sweep"].extend(table)
                        continue
                    fn = {"pallas": jax.jit(lambda x, e, *w, bs=bs: expert_ffn(x, e, *w, impl="pallas",
                                                                               block_sizes=bs))}
                    todo.append((f"sweep {s} {dt} T={T} tm={bs.tm} bf={bs.bf}", fn, bs, T))
            need = small(s) * (3 if phase == "perf" else 2)
            wsets = None
            for label, fn, bs, T in todo:
                if not budget.fits(need):
                    res["skipped"].append(f"{label} (time budget)")
                    continue
                if wsets is None:
                    wsets = weights(jax.random.key(7), D, F, DTYPES[dt], n_sets)
                out = res["perf"] if phase == "perf" else res["sweep"]
                step(label, need, lambda s=s, dt=dt, T=T, fn=fn, bs=bs, out=out, w=wsets: out.extend(
                    perf_rows(s, dt, T, w, res["peaks"], fn, args.quick, block_sizes=bs,
                              ragged_s=ragged_time(res["perf"], s, dt, T))))
            del wsets
    done()
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    ap.add_argument("--shapes", type=csv, default=["smollm2", "llama2_7b"], help="smollm2,llama2_7b")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in csv(s)], default=None,
                    help="T values for perf and sweep (default 8,4096; --quick: 8,64)")
    ap.add_argument("--dtypes", type=csv, default=["bf16", "f32"], help="bf16,f32")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (D=64, F=96): the CPU dry run")
    ap.add_argument("--out", default="runs/device_check", help="folder for device_check.json/.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip work that would run past this")
    args = ap.parse_args(argv)
    args.tokens = args.tokens or ([8, 64] if args.quick else [8, 4096])
    bad = [s for s in args.shapes if s not in SHAPES] + [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown shapes/dtypes {bad}; shapes {list(SHAPES)}, dtypes {list(DTYPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    res = run(args)
    print(format_tables(res))
    return 0 if res["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
