"""Benchmark the expert FFN impls against ``lax.ragged_dot`` x3, all in one run.

    python -m readme_jax.bench.expert_ffn [--quick] [--json out.json] [--dtype bf16|f32]

Shapes: SmolLM2 experts (D=576, F_e=768) and Llama-2-7B experts (D=4096, F_e=5504), E=8 experts.
Decode T in {1, 8, 32, 128, 256} over {1, 2, 4, 7} unique experts, prefill T=4096 over 7.
Per case: median time per call (after warmup; calls issued back to back and blocked on once per
repeat, so host dispatch overlaps), achieved GB/s (weights of the touched experts +
activations in and out) and TFLOP/s (6 T D F useful flops), their fraction of this device's
copy bandwidth and matmul rate (both measured at the start of the same run), and speedups
against ``ragged_dot x3`` (sort, three ``lax.ragged_dot``, unsort) and ``impl="xla"``.
The Pallas kernel is timed on GPU/TPU only (on CPU it runs in interpret mode: skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from readme_jax.kernels.xla_tiles import xla_ffn_ragged, xla_ffn_tiles, xla_tile_rows
from readme_jax.ops.expert_ffn import expert_ffn

SHAPES = {"smollm2": (576, 768), "llama2-7b": (4096, 5504)}
NUM_EXPERTS = 8
DECODE_T = (1, 8, 32, 128, 256)
UNIQUE = (1, 2, 4, 7)
PREFILL_T = 4096
QUICK = dict(shapes=("smollm2",), decode_t=(1, 8, 32, 128), unique=(1, 2, 7), prefill_t=4096)


def timeit(fn, *args, repeats: int = 7, target_s: float = 0.05) -> float:
    """Median seconds per call; each repeat issues enough calls to last about ``target_s``."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    inner = int(min(max(target_s / one, 1), 200))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_peaks(dtype, quick: bool) -> dict:
    """This device's copy bandwidth (read + write of a large array) and large-matmul rate."""
    cpu = jax.default_backend() == "cpu"
    n_copy = (2**25 if cpu else 2**28) // (4 if quick and cpu else 1)
    x = jnp.ones((n_copy,), dtype)
    copy = jax.jit(lambda a: a * 2)
    t = timeit(copy, x, repeats=5)
    gbps = 2 * x.size * x.dtype.itemsize / t / 1e9
    m = 1024 if cpu else 8192
    a = jnp.ones((m, m), dtype) / m
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
    t = timeit(mm, a, a, repeats=5)
    return {"copy_GBps": gbps, "matmul_TFLOPs": 2 * m**3 / t / 1e12, "copy_elems": n_copy, "matmul_n": m}


def make_case(key, D, F, T, unique, dtype):
    k = jax.random.split(key, 4)
    rng = np.random.default_rng(T * 131 + unique)
    experts = rng.choice(NUM_EXPERTS, unique, replace=False)
    ids = rng.permutation(np.resize(experts, T)).astype(np.int32)  # every chosen expert appears
    x = jax.random.normal(k[0], (T, D), dtype)
    wg = (jax.random.normal(k[1], (NUM_EXPERTS, D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    wu = (jax.random.normal(k[2], (NUM_EXPERTS, D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    wd = (jax.random.normal(k[3], (NUM_EXPERTS, F, D), jnp.float32) / np.sqrt(F)).astype(dtype)
    return x, jnp.asarray(ids), wg, wu, wd


def methods(backend: str) -> dict:
    m = {
        "ragged_dot x3": jax.jit(xla_ffn_ragged),
        "xla": jax.jit(lambda x, e, wg, wu, wd: expert_ffn(x, e, wg, wu, wd, impl="xla")),
    }
    if backend != "cpu":
        m["pallas"] = jax.jit(lambda x, e, wg, wu, wd: expert_ffn(x, e, wg, wu, wd, impl="pallas"))
    return m


def cases(quick: bool):
    shapes = QUICK["shapes"] if quick else tuple(SHAPES)
    decode_t = QUICK["decode_t"] if quick else DECODE_T
    unique = QUICK["unique"] if quick else UNIQUE
    prefill_t = QUICK["prefill_t"] if quick else PREFILL_T
    for name in shapes:
        for T in decode_t:
            for u in unique:
                if u <= T:
                    yield name, "decode", T, u
        yield name, "prefill", prefill_t, 7


def run(quick: bool, dtype_name: str | None, json_path: str | None) -> dict:
    backend = jax.default_backend()
    dtype = jnp.dtype(dtype_name or ("float32" if backend == "cpu" else "bfloat16"))
    dev = jax.devices()[0]
    peaks = measure_peaks(dtype, quick)
    meth = methods(backend)
    rows = []
    weights = {}
    todo = list(cases(quick))
    for name, phase, T, u in tqdm(todo, desc="expert_ffn bench", file=sys.stderr):
        D, F = SHAPES[name]
        if name not in weights:
            weights.clear()
            weights[name] = make_case(jax.random.key(0), D, F, 1, 1, dtype)[2:]
        x, ids = make_case(jax.random.key(T), D, F, T, u, dtype)[:2]
        wg, wu, wd = weights[name]
        isz = dtype.itemsize
        bytes_moved = u * 3 * D * F * isz + 2 * T * D * isz
        flops = 6 * T * D * F
        times = {m: timeit(f, x, ids, wg, wu, wd) for m, f in meth.items()}
        for m, t in times.items():
            rows.append(dict(
                shape=name, phase=phase, T=T, unique=u, method=m, ms=t * 1e3,
                GBps=bytes_moved / t / 1e9, TFLOPs=flops / t / 1e12,
                frac_copy_bw=bytes_moved / t / 1e9 / peaks["copy_GBps"],
                frac_matmul=flops / t / 1e12 / peaks["matmul_TFLOPs"],
                x_vs_ragged=times["ragged_dot x3"] / t, x_vs_xla=times["xla"] / t))
    result = dict(
        device=f"{dev.platform}: {dev.device_kind}", backend=backend, dtype=dtype.name,
        num_experts=NUM_EXPERTS, quick=quick, jax=jax.__version__,
        date=time.strftime("%Y-%m-%d"), peaks=peaks, rows=rows,
        note=None if backend != "cpu" else "pallas skipped on CPU (interpret mode only)")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def tm_sweep(dtype_name: str | None) -> str:
    """Time the XLA tile loop at several row tiles ``tm`` (SmolLM2 shapes): how
    ``ops.expert_ffn.xla_tile_rows`` was chosen. Returns a markdown table."""
    dtype = jnp.dtype(dtype_name or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    D, F = SHAPES["smollm2"]
    tms = (8, 16, 32, 64, 128)
    wg, wu, wd = make_case(jax.random.key(0), D, F, 1, 1, dtype)[2:]
    lines = ["| T | uniq | rule tm | " + " | ".join(f"tm={t} ms" for t in tms) + " |",
             "|---:|---:|---:|" + "---:|" * len(tms)]
    for T, u in tqdm([(32, 1), (32, 7), (128, 1), (128, 7), (256, 7), (2048, 7)], file=sys.stderr):
        x, ids = make_case(jax.random.key(T), D, F, T, u, dtype)[:2]
        cells = []
        for tm in tms:
            f = jax.jit(lambda *a, tm=tm: xla_ffn_tiles(*a, tm=min(tm, T)))
            cells.append(f"{timeit(f, x, ids, wg, wu, wd, repeats=5) * 1e3:.2f}" if tm <= T else "-")
        lines.append(f"| {T} | {u} | {xla_tile_rows(T, NUM_EXPERTS)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    p = result["peaks"]
    lines = [
        f"device: {result['device']}, dtype {result['dtype']}, E={result['num_experts']}, "
        f"jax {result['jax']}, {result['date']}",
        f"measured: copy {p['copy_GBps']:.1f} GB/s (read+write {p['copy_elems']} elems), "
        f"matmul {p['matmul_TFLOPs']:.3f} TFLOP/s ({p['matmul_n']}^3)",
    ]
    if result.get("note"):
        lines.append(result["note"])
    lines += ["", "| shape | phase | T | uniq | method | ms | GB/s | TFLOP/s | %copy BW | %matmul "
                  "| x vs ragged_dot x3 | x vs xla |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['phase']} | {r['T']} | {r['unique']} | {r['method']} | "
            f"{r['ms']:.3f} | {r['GBps']:.1f} | {r['TFLOPs']:.3f} | {100 * r['frac_copy_bw']:.1f} | "
            f"{100 * r['frac_matmul']:.1f} | {r['x_vs_ragged']:.2f} | {r['x_vs_xla']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized subset (SmolLM2 shapes, fewer T)")
    ap.add_argument("--json", help="write all rows and the measured peaks to this file")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="default bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--tm-sweep", action="store_true",
                    help="instead: time the XLA tile loop over row tiles tm (SmolLM2 shapes)")
    args = ap.parse_args(argv)
    if args.tm_sweep:
        dev = jax.devices()[0]
        print(f"device: {dev.platform}: {dev.device_kind}, E={NUM_EXPERTS}, {time.strftime('%Y-%m-%d')}")
        print(tm_sweep(args.dtype))
        return
    print(format_table(run(args.quick, args.dtype, args.json)))


if __name__ == "__main__":
    main()
