"""bench/seed_spread: per-run and pooled paired comparisons over finished runs' block NLLs."""

import json

import numpy as np

from readme_jax.bench import seed_spread
from readme_jax.eval.spread import paired_difference, t_interval


def _run(tmp_path, name, rng, shift):
    blocks = {m: {d: (rng.normal(3.0, 0.3, 16) + (shift[d] if m == "readme_trained" else 0)).tolist()
                  for d in ("code", "bible")} for m in ("readme_trained", "pruned_dense_tuned")}
    doc = {"nll_blocks": blocks, "ppl": {m: {d: float(np.exp(np.mean(v))) for d, v in b.items()}
                                         for m, b in blocks.items()}, "router_accuracy": 0.9, "locality_mean": 0.8}
    (tmp_path / name / "final_eval").mkdir(parents=True)
    (tmp_path / name / "final_eval" / "done.json").write_text(json.dumps(doc))
    return doc


def test_runs_pool_and_across(tmp_path):
    rng = np.random.default_rng(int(np.random.randint(1 << 20)))
    docs = [_run(tmp_path, f"r{i}", rng, {"code": -1.0, "bible": 0.0}) for i in range(3)]
    out = seed_spread.main(["--runs", *[f"r{i}={tmp_path / f'r{i}'}" for i in range(3)], "--pool", "r0,r1,r2",
                            "--across", "r0,r2", "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "o.png")])
    assert all(r["better"] >= 1 and r["significant"] >= 1 for r in out["runs"].values())  # code: -1 nat per block
    pooled = {m: np.mean([np.asarray(d["nll_blocks"][m]["bible"]) for d in docs], 0)
              for m in ("readme_trained", "pruned_dense_tuned")}
    assert out["pooled"]["comparison"]["bible"] == paired_difference(pooled["readme_trained"], pooled["pruned_dense_tuned"])
    want = t_interval([float(np.mean(d["nll_blocks"]["readme_trained"]["code"]) -
                             np.mean(d["nll_blocks"]["pruned_dense_tuned"]["code"])) for d in (docs[0], docs[2])])
    assert out["across_runs"]["t_interval"]["code"] == want
    assert json.loads((tmp_path / "o.json").read_text())["pooled"]["runs"] == ["r0", "r1", "r2"]
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert out["command"].endswith(f"--pool r0,r1,r2 --across r0,r2 --json {tmp_path / 'o.json'} --plot {tmp_path / 'o.png'}")
