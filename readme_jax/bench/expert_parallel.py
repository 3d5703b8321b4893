"""Expert-parallel MoE layer vs the single-device layer, on N devices, in one run.

    python -m readme_jax.bench.expert_parallel [--devices 8] [--quick] [--json out.json]

Times one Read-ME MoE FFN layer step (forward + backward w.r.t. tokens and expert weights) on
``B x T`` tokens with E experts:

- ``single``: ``moe.routed_ffn("xla")`` on one device;
- ``ep <mesh> <comm>``: ``expert_parallel_ffn`` with experts over the expert axis, tokens over
  ``(data, expert)``;
- ``ep (1,N) local only``: the same shard_map as ``psum`` on ``(1,N)`` with the collectives
  removed (tokens handed in already gathered, partial outputs returned unsummed): the
  per-device compute alone. ``comm share = 1 - local_only / psum`` (best-of-rounds times);
- ``ep (1,N) collectives only``: psum mode's all-gather + reduce-scatter (forward and backward)
  with no expert compute: the communication alone, as a second estimate (``/ psum``).

On CPU the N devices are fake (``--xla_force_host_platform_device_count``, set by this module
before JAX's backend starts) and share the machine's cores, so ``ep / single`` measures overhead, not
speedup. Each result's output is compared with the single-device layer (exact for dropless modes; with
a capacity factor the dropped tokens' rows are 0 and are counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import xla_bridge  # private, but the only way to ask whether the backend has started
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from readme_jax.config import MeshConfig
from readme_jax.distributed.expert_parallel import W_IN, W_OUT, _local_ffn, expert_parallel_ffn
from readme_jax.distributed.mesh import make_mesh
from readme_jax.errors import ConfigError
from readme_jax.model.moe import routed_ffn

SHAPES = {"full": dict(B=16, T=128, D=256, F=512, E=8), "quick": dict(B=8, T=64, D=128, F=256, E=8)}


def _force_devices(n: int) -> None:
    """Ask for ``n`` fake CPU devices. Importing jax does not start a backend; XLA_FLAGS is read
    when the first one starts, so the flag still works here unless something already used JAX."""
    if xla_bridge.backends_are_initialized():
        if jax.device_count() < n:
            raise ConfigError(f"expert_parallel bench needs {n} devices but JAX already started with "
                              f"{jax.device_count()}; run it as `python -m readme_jax.bench.expert_parallel`")
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    if jax_platform_is_cpu() and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def jax_platform_is_cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("cpu", "")


def run(n_devices: int, quick: bool, repeats: int) -> dict:
    s = SHAPES["quick" if quick else "full"]
    B, T, D, F, E = s["B"], s["T"], s["D"], s["F"], s["E"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    route = rng.integers(0, E, (B, T)).astype(np.int32)
    ct = rng.standard_normal((B, T, D)).astype(np.float32)  # fixed output cotangent
    lp = {"wg": rng.standard_normal((E, D, F)).astype(np.float32) * D**-0.5,
          "wu": rng.standard_normal((E, D, F)).astype(np.float32) * D**-0.5,
          "wd": rng.standard_normal((E, F, D)).astype(np.float32) * F**-0.5}

    def layer_step(ffn):
        def loss(lp, x, r):
            y, dropped = ffn(lp, x, r)
            return jnp.sum(y * ct), (y, jnp.sum(jnp.asarray(0 if dropped is None else dropped)))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    single = layer_step(routed_ffn("xla"))
    (_, (y_ref, _)), _ = single(lp, x, route)
    y_ref = np.asarray(y_ref)
    cases = [("single", None, None)]
    n = n_devices
    meshes = [(1, n), (n // 2, 2)] if n >= 4 else [(1, n)]
    for dm in meshes:
        cases += [(f"ep {dm} psum", dm, "psum"), (f"ep {dm} all_to_all", dm, "all_to_all")]
    cases += [(f"ep {(1, n)} all_to_all cf=1.25", (1, n), "all_to_all:1.25"), (f"ep {(1, n)} local only", (1, n), "local"),
              (f"ep {(1, n)} collectives only", (1, n), "comm")]
    prepared = []
    for name, dm, comm in tqdm(cases, desc="compile", leave=False):
        if dm is None:
            dev = jax.devices()[0]
            fn, args = single, tuple(jax.device_put(a, dev) for a in (lp, x, route))
        else:
            mesh = make_mesh(MeshConfig(data=dm[0], expert=dm[1]))
            sl = {k: jax.device_put(v, NamedSharding(mesh, W_OUT if k == "wd" else W_IN)) for k, v in lp.items()}
            if comm == "local":  # one full copy of the tokens per device, as the all-gather would leave
                copies = NamedSharding(mesh, P("expert"))
                rep = lambda a: jax.device_put(np.broadcast_to(a, (dm[1],) + a.shape), copies)  # noqa: E731
                args = (sl, rep(x), rep(route))
            else:
                tok = NamedSharding(mesh, P(("data", "expert")))
                args = (sl, jax.device_put(x, tok), jax.device_put(route, tok))
            if comm == "local":
                fn = _local_only(mesh, ct)
            elif comm == "comm":
                fn = _collectives_only(mesh, ct)
            else:
                c, _, cf = comm.partition(":")
                fn = layer_step(expert_parallel_ffn(mesh, comm=c, capacity_factor=float(cf or 0)))
        (_, (y, dropped)), _ = jax.block_until_ready(fn(*args))  # compile + warm up
        exact = comm not in ("local", "comm")
        err = float(np.abs(np.asarray(y) - y_ref).max() / np.abs(y_ref).max()) if exact else None
        prepared.append((name, fn, args, {"case": name, "max_rel_err_vs_single": err,
                                          "dropped_tokens": int(dropped) if exact else None}))
    times = {name: [] for name, *_ in prepared}
    for _ in tqdm(range(repeats), desc="timing rounds", leave=False):  # interleaved: load drift hits all alike
        for name, fn, args, _ in prepared:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    rows = [{**row, "seconds": min(times[name]), "median_seconds": statistics.median(times[name])}
            for name, _, _, row in prepared]
    base = rows[0]["seconds"]
    by = {r["case"]: r["seconds"] for r in rows}
    for r in rows:
        r["vs_single"] = r["seconds"] / base
    psum, local, coll = by[f"ep {(1, n)} psum"], by[f"ep {(1, n)} local only"], by[f"ep {(1, n)} collectives only"]
    return {"collectives_over_psum_1xN": coll / psum, "devices": jax.device_count(), "backend": jax.default_backend(), "shape": s, "repeats": repeats,
            "cpu_cores": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
            "rows": rows, "comm_share_psum_1xN": 1 - local / psum}


def _local_only(mesh, ct):
    """psum mode's per-device work with no collectives: every device gets its own copy of the
    gathered tokens (an ``[n, B, T, D]`` input split over ``expert``) and returns its partial
    output unsummed, so neither direction needs communication."""

    def body(x, r, wg, wu, wd):
        x, r = x[0], r[0]
        base = lax.axis_index("expert") * wg.shape[0]
        D = x.shape[-1]
        y = _local_ffn(x.reshape(-1, D), (r - base).reshape(-1), wg, wu, wd, "xla", {})
        return y.reshape(x.shape)[None]

    n = mesh.shape["expert"]
    sm = jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P("expert"), W_IN, W_IN, W_OUT),
                       out_specs=P("expert"))

    def loss(lp, x_n, r_n):
        y = sm(x_n, r_n, lp["wg"], lp["wu"], lp["wd"])  # [n, B, T, D] unsummed partials
        return jnp.sum(y * ct[None]), (y, 0)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _collectives_only(mesh, ct):
    """psum mode's collectives with no expert compute: all-gather the tokens, reduce-scatter them back."""

    def body(x, r):
        xg = lax.all_gather(x, "expert", axis=0, tiled=True)
        rg = lax.all_gather(r, "expert", axis=0, tiled=True)
        y = xg * (rg >= 0)[..., None].astype(xg.dtype)  # keeps the route gather alive
        return lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    tok = P(("data", "expert"))
    sm = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok), out_specs=tok)

    def loss(lp, x, r):
        y = sm(x, r)
        return jnp.sum(y * ct) + 0 * sum(jnp.sum(w[:1, :1, :1]) for w in lp.values()), (y, 0)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="smaller layer (B=8, T=64, D=128, F=256)")
    ap.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds (best and median kept)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    _force_devices(args.devices)
    res = run(args.devices, args.quick, args.repeats)
    s = res["shape"]
    print(f"Read-ME MoE layer step (fwd+bwd), B={s['B']} T={s['T']} D={s['D']} F_e={s['F']} E={s['E']}, "
          f"{res['devices']} {res['backend']} devices, best of {res['repeats']} interleaved rounds")
    print(f"host: {res['cpu_cores']} cores, 1-min load average {res['load_avg_1min']:.1f} at the end")
    print(f"{'case':<34}{'ms':>9}{'median':>9}{'x single':>10}{'max rel err':>13}{'dropped':>9}")
    for r in res["rows"]:
        err = "-" if r["max_rel_err_vs_single"] is None else f"{r['max_rel_err_vs_single']:.1e}"
        drop = "-" if r["dropped_tokens"] is None else str(r["dropped_tokens"])
        print(f"{r['case']:<34}{r['seconds'] * 1e3:>9.2f}{r['median_seconds'] * 1e3:>9.2f}{r['vs_single']:>10.2f}"
              f"{err:>13}{drop:>9}")
    print(f"(1,{args.devices}) psum layer: communication share 1 - local_only/psum = {res['comm_share_psum_1xN']:.1%}; "
          f"collectives_only/psum = {res['collectives_over_psum_1xN']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
