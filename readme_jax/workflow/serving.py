"""Stage `serve_bench`: the serving benchmark on the trained Read-ME model (see readme_jax.serve.bench)."""

from __future__ import annotations

import time

from readme_jax.workflow.workspace import Workspace


def run_serve_bench(ws: Workspace) -> dict:
    t0 = time.time()
    from readme_jax.serve import bench

    out = bench.run_from_workspace(ws)
    ws.mark_done("serve_bench", out, time.time() - t0)
    return out
