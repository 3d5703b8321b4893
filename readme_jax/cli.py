"""`readme-jax <command>`: a thin layer over readme_jax.workflow and friends.

Every command takes ``--config FILE|PRESET`` (a YAML file, or a name in ``configs/`` such as
``smollm2_135m_quick``) and ``key=value`` overrides (``train.rounds=2``); unknown keys are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import traceback
from pathlib import Path

from readme_jax import config as config_mod
from readme_jax.data import prepare_domains
from readme_jax.distributed.lead import is_lead, lead_only
from readme_jax.distributed.multihost import detect_launch, initialize_from_env
from readme_jax.config import SCHEDULER_POLICIES, MeshConfig
from readme_jax.errors import ReadmeError
from readme_jax.serve.api.http import serve
from readme_jax.serve.api.llm import LLM
from readme_jax.train import memory
from readme_jax.workflow.export import export_workspace
from readme_jax.workflow.frontier import default_points, run_frontier
from readme_jax.workflow.run import STAGE_FNS, run
from readme_jax.workflow.workspace import Workspace


def installed_config_dir(files) -> Path | None:
    """The presets of a wheel install: ``pyproject`` ships ``configs/*.yaml`` as data files under
    ``<prefix>/share/readme-jax/configs`` (the prefix differs between pip schemes, so the package's
    RECORD ``files`` say where)."""
    for f in files or ():
        if f.suffix == ".yaml" and tuple(f.parts[-3:-1]) == ("readme-jax", "configs"):
            return Path(f.locate()).resolve().parent
    return None


def _config_dir() -> Path:
    """``configs/`` of a source checkout (editable installs too), else the installed presets."""
    checkout = Path(__file__).resolve().parents[1] / "configs"
    if checkout.is_dir():
        return checkout
    try:
        return installed_config_dir(importlib.metadata.files("readme-jax")) or checkout
    except importlib.metadata.PackageNotFoundError:
        return checkout


CONFIG_DIR = _config_dir()
DEFAULT_PRESET = "smollm2_135m_quick"


def resolve_config(name: str | None) -> Path:
    if name is None:
        name = DEFAULT_PRESET
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise config_mod.ConfigError(f"config file not found: {p}")
        return p
    cand = CONFIG_DIR / f"{name}.yaml"
    if cand.is_file():
        return cand
    presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise config_mod.ConfigError(f"no config file or preset named {name!r}; presets: {presets}")


def load_run_config(args, stages: tuple[str, ...] | None = None) -> config_mod.RunConfig:
    cfg = config_mod.load(config_mod.RunConfig, resolve_config(args.config), args.overrides)
    if stages is not None:
        cfg = dataclasses.replace(cfg, stages=stages)
    return cfg


def _common(p: argparse.ArgumentParser):
    p.add_argument("--config", default=None, help=f"YAML file or preset name in configs/ (default {DEFAULT_PRESET})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--recompute", action="store_true",
                   help="redo finished stages made with other settings (default: refuse, naming the changed keys)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.rounds=2 output_dir=runs/x")


def _run_stages(args, stages):
    cfg = load_run_config(args, stages)
    force = tuple(s for s in (getattr(args, "force", "") or "").split(",") if s)
    bad = [s for s in force if s not in STAGE_FNS]
    if bad:
        raise config_mod.ConfigError(f"--force: unknown stage(s) {bad}; valid: {list(STAGE_FNS)}")
    return run(cfg, progress=not args.no_progress, force=force, recompute=args.recompute)


def cmd_run(args):
    _run_stages(args, None)


def cmd_eval_dense(args):
    ws = _run_stages(args, ("dense_eval",))
    info = ws.done_info("dense_eval")
    if args.json and is_lead():
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(json.dumps({"ppl": info["ppl"], "completion": info["completion"]}, indent=1))


def cmd_refactor(args):
    _run_stages(args, ("refactor", "refactor_eval") if args.eval else ("refactor",))


def cmd_train(args):
    _run_stages(args, ("refactor", "train"))


def cmd_serve_bench(args):
    _run_stages(args, ("refactor", "train", "serve_bench"))


def cmd_export(args):
    ws = Workspace(load_run_config(args), progress=not args.no_progress)
    path = lead_only("export", lambda: export_workspace(ws, Path(args.out), overwrite=args.overwrite,
                                                        hf_experts=args.hf_experts))
    print(f"exported to {path}" if path is not None else f"process 0 exported to {args.out}")


def cmd_generate(args):
    llm = LLM.open(args.path, dense=args.dense, n_slots=1, max_len=args.max_len)
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=args.stop or None)
    if args.chat:
        deltas = llm.chat_stream([{"role": "user", "content": args.prompt}], **options)
    else:
        deltas = llm.stream(args.prompt, **options)
    for delta in deltas:
        print(delta, end="", flush=True)
    print()


def cmd_serve(args):
    mesh = None
    if args.mesh_expert * args.mesh_model > 1:  # experts sharded over the first expert x model devices
        mesh = MeshConfig(data=1, expert=args.mesh_expert, model=args.mesh_model)
    serve(args.path, host=args.host, port=args.port, dense=args.dense, policy=args.policy, n_slots=args.slots,
          max_len=args.max_len, max_queue=args.max_queue, mesh=mesh, warm=not args.no_warm)


def cmd_frontier(args):
    points = default_points()
    if args.only:
        unknown = sorted(set(args.only) - {p.name for p in points})
        if unknown:
            raise config_mod.ConfigError(f"frontier: unknown point(s) {unknown}; points: {[p.name for p in points]}")
        points = [p for p in points if p.name in args.only]
    out = Path(args.out)
    doc = run_frontier(load_run_config(args), out, points, Path(args.json or out / "frontier.json"),
                       Path(args.plot or out / "frontier.png"), progress=not args.no_progress)
    print(f"frontier: {len(doc['points'])} points in {args.json or out / 'frontier.json'}")


def cmd_data(args):
    rep = prepare_domains(args.domains or None, allow_apt=not args.no_apt)
    for n, m in rep.available.items():
        print(f"{n:12s} {m.get('n_docs', '?'):>8} docs {m.get('n_chars', '?'):>12} chars")
    for n, why in rep.missing.items():
        print(f"{n:12s} MISSING: {why}")


def cmd_memory(args):
    cfg = load_run_config(args)
    setup = memory.setup_of_run(cfg, args.devices, args.arch, args.expert_width, args.shared_width)
    print(memory.format_table(memory.estimate(setup), args.device_gib))


def cmd_lm_eval(argv: list[str]) -> None:
    """lm_eval's own command line with the ``readme-jax`` model registered (see bench/lm_eval_adapter.py)."""
    from readme_jax.bench import lm_eval_adapter  # local import: lm-eval is an optional extra (pip install .[eval])

    lm_eval_adapter.main(argv)


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("path", help="a run folder (its trained Read-ME model), its train/final, or an export")
    p.add_argument("--dense", action="store_true", help="the run's dense source model instead (A/B)")
    p.add_argument("--max-len", type=int, default=512, help="prompt + generated tokens per request")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="readme-jax", description="Read-ME (router-decoupled MoE) on JAX. "
                                 "Errors print one line; add --debug anywhere for the traceback.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the whole pipeline: dense eval, refactor, train, evaluate, serve-bench, report")
    _common(p)
    p.add_argument("--force", default="", help="comma-separated stages to redo even if done")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("eval-dense", help="per-domain perplexity and a greedy completion of the dense model")
    _common(p)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(fn=cmd_eval_dense)
    p = sub.add_parser("refactor", help="calibrate and extract experts; write the MoE checkpoint")
    _common(p)
    p.add_argument("--eval", action="store_true", help="also compute the four-way perplexity table")
    p.set_defaults(fn=cmd_refactor)
    p = sub.add_parser("train", help="alternating router / expert tuning (refactors first if needed)")
    _common(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("serve-bench", help="serving benchmark: expert-aware batching vs baselines, cache policies")
    _common(p)
    p.set_defaults(fn=cmd_serve_bench)
    p = sub.add_parser("export", help="export the trained Read-ME model as safetensors + JSON")
    _common(p)
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.add_argument("--hf-experts", action="store_true",
                   help="also write every expert as a standalone Hugging Face Llama (OUT/hf_experts/)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("generate", help="stream one completion of a trained model to the terminal")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (streaming) for a trained model")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", default="expert_aware", choices=SCHEDULER_POLICIES, help="batching policy")
    p.add_argument("--slots", type=int, default=8, help="KV slots (requests decoding at once)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    p.add_argument("--mesh-expert", type=int, default=1,
                   help="shard the experts over this many devices (docs/SERVING.md, 'On a mesh')")
    p.add_argument("--mesh-model", type=int, default=1, help="and each expert's columns over this many")
    p.add_argument("--no-warm", action="store_true",
                   help="do not compile the engine's common step programs before listening (they compile on first use)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("memory", help="per-device memory of the expert-tuning step (eval_shape; nothing allocated)")
    p.add_argument("--config", default=None, help=f"YAML file or preset name in configs/ (default {DEFAULT_PRESET})")
    p.add_argument("--arch", default=None, choices=sorted(memory.ARCHS),
                   help="a known architecture instead of reading config.json at model=")
    p.add_argument("--devices", type=int, default=8, help="devices of the one host the mesh spans (default 8)")
    p.add_argument("--device-gib", type=float, default=None, help="say whether it fits devices of this size")
    p.add_argument("--expert-width", type=int, default=None,
                   help="R, the expert-specific width (default F_e = round(r F), the fixed layout's)")
    p.add_argument("--shared-width", type=int, default=None, help="P, the split layout's shared width (default 0)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.remat=none")
    p.set_defaults(fn=cmd_memory)
    p = sub.add_parser("frontier", help="the sparsity-quality frontier: expert width x shared fraction x tuning loss, "
                       "Read-ME vs its pruned twin (one run folder per point; docs/RESULTS.md)")
    _common(p)
    p.add_argument("--out", required=True, help="folder of the points' run folders")
    p.add_argument("--only", nargs="*", default=None, help="run only these points (names as in frontier.json)")
    p.add_argument("--json", default=None, help="where to write the result (default OUT/frontier.json)")
    p.add_argument("--plot", default=None, help="where to draw it (default OUT/frontier.png)")
    p.set_defaults(fn=cmd_frontier)
    p = sub.add_parser("data", help="fetch and cache the offline text domains")
    p.add_argument("domains", nargs="*")
    p.add_argument("--no-apt", action="store_true")
    p.set_defaults(fn=cmd_data)
    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with --model readme-jax (lm_eval's "
                       "arguments follow; docs/EVALUATION.md)")
    p.set_defaults(fn=lambda args: cmd_lm_eval(["--help"]))
    return ap


MAIN_JOB_COMMANDS = ("run", "eval-dense", "refactor", "train", "serve-bench", "export")


def join_from_env() -> dict | None:
    """Join ``jax.distributed`` when the environment describes a multi-process launch (SLURM, TPU pod,
    explicit ``READMEJAX_*``; distributed/multihost.py), before any JAX work; then process 0 runs
    the command and the others wait (workflow/run.py). Single-process: nothing happens."""
    if detect_launch().method == "single":
        return None
    info = initialize_from_env()
    print(f"readme-jax: process {info['process_id']} of {info['process_count']} ({info['method']} launch, "
          f"{info['global_devices']} {info['platform']} devices)", file=sys.stderr, flush=True)
    return info


def main(argv=None) -> int:
    """Exit 0 on success; 2 with one line on a user or environment error (``--debug``: the
    traceback too); 130 on Ctrl-C (a rerun of the same command resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["lm-eval"]:  # every later argument is lm_eval's, not ours
        cmd_lm_eval(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        if args.command in MAIN_JOB_COMMANDS:
            join_from_env()
        args.fn(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("readme-jax: interrupted; rerunning the same command resumes", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # skip interpreter teardown: XLA and orbax threads may still run (it segfaulted)
    except (ReadmeError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"readme-jax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, ReadmeError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or type(e).__name__}{where} (run again with --debug for the traceback)"
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
