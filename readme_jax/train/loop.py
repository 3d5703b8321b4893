"""Read-ME's alternating rounds: { router tuning ; expert tuning } x R, resumable.

Stage s = 2*round + (0: router, 1: experts). After every stage the router and backbone params
go to an orbax CheckpointManager (step = number of finished stages) with the stage's metrics;
a rerun restores the latest one and continues with the next stage. Each stage's data and
randomness are a function of (seed, round, stage) alone, so a run killed at any step and
resumed redoes the unfinished stage exactly and ends with the same params (bitwise on CPU) as an
uninterrupted run. A non-finite loss stops the stage with a TrainingError; the last good
checkpoint is left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from readme_jax.checkpoints.orbax_io import local_checkpointer, local_manager_options, savable
from readme_jax.config import ROUTER_TARGETS, MeshConfig, TrainConfig
from readme_jax.distributed.mesh import gather_tree, pad_experts, unpad_experts
from readme_jax.errors import ConfigError, TrainingError
from readme_jax.fsutil import atomic_dir, remove_tree
from readme_jax.jsonfile import read_json, write_json
from readme_jax.eval.routing import expert_load, locality, readme_domain_nll, route_accuracy, routes_for
from readme_jax.model.moe import routed_ffn
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.train import distill, schedule, steps
from readme_jax.train.sharded_step import ShardedLMStep
from readme_jax.train.tracking import Trackers


class TrainData(Protocol):
    """What the loop needs from the data pipeline (deterministic in its arguments)."""

    domains: list[str]

    def router_set(self, round_idx: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """``(blocks [n, T+1] int32, domain index [n])`` for one round's router tuning."""

    def expert_batch(self, round_idx: int, step: int, batch_size: int) -> np.ndarray:
        """``[batch_size, T+1]`` int32 LM blocks for one optimizer step of expert tuning."""

    def val_blocks(self) -> dict[str, np.ndarray]:
        """Held-out ``[n, T+1]`` blocks per domain."""


@dataclasses.dataclass
class Trainer:
    """Runs the rounds on a :class:`ReadMEModel`: ``run(model) -> trained model`` (same configs and layout)."""

    train_cfg: TrainConfig
    channel_index_LEF: np.ndarray  # which dense channel each expert column came from
    ffn_dim: int  # the dense FFN width (channel space of channel_index)
    data: TrainData
    out_dir: Path
    impl: str = "xla"
    progress: bool = True
    eval_batch_size: int = 4
    log: Callable[[str], None] = print
    on_stage_end: Callable[[int, str, ReadMEModel], None] | None = None  # (stage, name, model)
    mesh_cfg: MeshConfig | None = None  # expert tuning data x expert parallel when several devices exist
    router_target: str = "domain"  # domain | distill | domain+distill (RouterConfig.target)
    # expert tuning's loss (train.expert_loss; train/recovery.py); a teacher loss needs the dense teacher's params
    loss: steps.LossSpec = steps.LM_ONLY
    teacher_params: dict | None = None

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.metrics_dir = self.out_dir / "metrics"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.n_experts = int(self.channel_index_LEF.shape[1])
        self.expert_mask_LEF = distill.expert_masks_from_index(self.channel_index_LEF, self.ffn_dim)
        tc = self.train_cfg
        rtx = schedule.make_optimizer(tc.router, tc.weight_decay, tc.clip_norm)
        etx = schedule.make_optimizer(tc.experts, tc.weight_decay, tc.clip_norm)
        if self.loss.uses_teacher and self.teacher_params is None:
            raise ConfigError(f"expert loss {self.loss.kind!r} learns from the dense model: give teacher_params")
        if self.router_target not in ROUTER_TARGETS:
            raise ConfigError(f"router target must be one of {ROUTER_TARGETS}, got {self.router_target!r}")
        self._router_tx = rtx
        self._expert_tx = etx
        self._router_steps = {}  # loss kind -> compiled step (domain labels: "kl" = cross-entropy)
        self._expert_step = None  # built on the first expert stage: every round reuses it
        self._expert_pad = 1
        self._stage_info = {}
        self._events = Trackers(self.out_dir, tc.wandb_project, config={"train": dataclasses.asdict(tc)})
        (self.out_dir / "ckpt").mkdir(parents=True, exist_ok=True)
        self._ckpt = ocp.CheckpointManager(  # this process's arrays only (the main job's process 0)
            (self.out_dir / "ckpt").absolute(), options=local_manager_options(max_to_keep=2))

    # ------------------------------------------------------------------ public

    @property
    def n_stages(self) -> int:
        return 2 * self.train_cfg.rounds

    def run(self, model: ReadMEModel, stop_after_stages: int | None = None) -> ReadMEModel:
        """Run (or resume) all rounds from ``model``; ``stop_after_stages`` simulates a kill (for tests)."""
        weights = model
        if weights.n_experts != self.n_experts:
            raise ConfigError(f"trainer has channel indices for {self.n_experts} experts, the model "
                              f"{weights.n_experts}")
        done = self._ckpt.latest_step() or 0
        if done:
            weights = self._restore(done, weights)
            self.log(f"resuming after stage {done}/{self.n_stages} from {self.out_dir / 'ckpt'}")
        else:
            self._write_stage_summary(-1, "initial", weights, {})
        for s in range(done, self.n_stages):
            if stop_after_stages is not None and s >= stop_after_stages:
                break
            round_idx, kind = divmod(s, 2)
            if kind == 0:
                weights = self.on_device(weights)
                weights, step_metrics = self._router_stage(round_idx, weights)
            else:
                weights = self.offload(weights)  # sharded: device 0 holds only its part of the step's state
                weights, step_metrics = self._expert_stage(round_idx, weights)
                weights = self.on_device(weights)
            name = f"round{round_idx}-{'router' if kind == 0 else 'experts'}"
            self._write_stage_summary(s, name, weights, step_metrics)
            if self.on_stage_end is not None:  # before the checkpoint: a kill in it redoes the stage
                self.on_stage_end(s, name, weights)
            self._ckpt.save(s + 1, args=ocp.args.StandardSave(savable({"router": weights.router_params,
                                                                       "backbone": weights.backbone_params})))
            self._ckpt.wait_until_finished()
            remove_tree(self._mid_dir)  # this stage's mid-stage state is superseded
        self._events.close()
        return weights

    @property
    def sharded(self) -> bool:
        """Expert tuning runs on a mesh (a ``mesh:`` section and several devices)."""
        return self.mesh_cfg is not None and jax.device_count() > 1

    def offload(self, model: ReadMEModel) -> ReadMEModel:
        """With a sharded expert step: the backbone's params as host arrays, so no device keeps the whole
        model while the step's state is on the mesh (pass the caller's model through this and drop the
        device copy). One device: unchanged."""
        return model.replace(backbone_params=jax.device_get(model.backbone_params)) if self.sharded else model

    def on_device(self, model: ReadMEModel) -> ReadMEModel:
        """The backbone back on the first device (router stages, evaluation), after :meth:`offload`."""
        if not self.sharded:
            return model
        return model.replace(backbone_params=jax.device_put(model.backbone_params, jax.local_devices()[0]))

    # ------------------------------------------------------------------ stages

    def _check(self, loss: float, stage: str, step: int):
        if not math.isfinite(loss):
            last = self._ckpt.latest_step() or 0
            raise TrainingError(
                f"non-finite loss ({loss}) in {stage} at step {step}; stopped. The last good checkpoint "
                f"(after stage {last}) is kept in {self.out_dir / 'ckpt'}")

    def _router_stage(self, round_idx: int, w: ReadMEModel):
        tc, st = self.train_cfg, self.train_cfg.router
        micro = st.batch_size // st.grad_accum
        blocks, dom = self.data.router_set(round_idx, st.steps * st.batch_size)
        if self._uses_domain_labels(round_idx):
            targets, loss_kind = distill.domain_targets(dom, blocks.shape[1] - 1, self.n_experts), "kl"
            self._stage_info = {"router_target": "domain"}
        else:
            targets, loss_kind = self._teacher_targets(round_idx, w, blocks, dom), tc.router_loss
        tx, step_fn = self._router_tx, self._router_step(w, loss_kind)
        state = {"params": w.router_params, "opt_state": tx.init(w.router_params)}
        start, state, rows = self._mid_restore(2 * round_idx, state)
        name = f"round {round_idx} router"
        n_micro = st.steps * st.grad_accum
        for i in tqdm(range(start * st.grad_accum, n_micro), desc=name, disable=not self.progress,
                      initial=start * st.grad_accum, total=n_micro):
            sl = slice(i * micro, (i + 1) * micro)
            lr = schedule.lr_at(st, round_idx, tc.lr_decay_per_round, i // st.grad_accum)
            params, opt_state, m = step_fn(state["params"], state["opt_state"], jnp.asarray(blocks[sl, :-1]),
                                           targets[sl], lr)
            state = {"params": params, "opt_state": opt_state}
            m = {k: float(v) for k, v in m.items()}
            self._check(m["loss"], name, i)
            rows.append({"round": round_idx, "stage": "router", "micro_step": i, "global_step": round_idx * n_micro + i,
                         **m})
            if (i + 1) % st.grad_accum == 0:
                self._mid_save(2 * round_idx, (i + 1) // st.grad_accum, st.steps, state, rows)
        return w.replace(router_params=state["params"]), rows

    def _uses_domain_labels(self, round_idx: int) -> bool:
        return self.router_target == "domain" or (self.router_target == "domain+distill" and round_idx == 0)

    def _router_step(self, model: ReadMEModel, loss_kind: str):
        if loss_kind not in self._router_steps:
            self._router_steps[loss_kind] = steps.make_router_step(model, self._router_tx, loss_kind)
        return self._router_steps[loss_kind]

    def _expert_step_fn(self, model: ReadMEModel):
        """The LM step of expert tuning (sharded over a mesh when several devices exist), built once."""
        if self._expert_step is None:
            route_fn = steps.router_route_fn(model)
            remat = self.train_cfg.remat == "layer"
            if self.mesh_cfg is not None and jax.device_count() > 1:
                self._expert_step = ShardedLMStep.from_config(model.backbone_cfg, self.mesh_cfg, self._expert_tx,
                                                              route_fn, impl=self.impl, remat=remat, donate=True,
                                                              loss=self.loss)
                self._expert_pad = int(self._expert_step.mesh.shape["expert"])
            else:
                self._expert_step = steps.make_lm_step(model.backbone_cfg, routed_ffn(self.impl), route_fn,
                                                       self._expert_tx, remat=remat, loss=self.loss)
        return self._expert_step

    def _teacher_targets(self, round_idx, w: ReadMEModel, blocks, dom):
        """Target distributions ``[n, T, E]`` from one teacher pass per round; the target's signal
        (best-vs-second overlap gap) and its agreement with the domain label go to the stage summary."""
        tokens = blocks[:, :-1]
        if round_idx == 0:  # the experts were made per domain: route each block to its domain's expert
            route = np.broadcast_to(np.asarray(dom)[:, None] % self.n_experts, tokens.shape).astype(np.int32)
        else:
            route = routes_for(w, blocks, self.eval_batch_size)
        out, overlaps = [], []
        bs = self.eval_batch_size
        for s in tqdm(range(0, len(tokens), bs), desc=f"round {round_idx} teacher", disable=not self.progress,
                      leave=False):
            ov = distill.teacher_overlap(w.backbone_params, jnp.asarray(self.channel_index_LEF), self.expert_mask_LEF,
                                         jnp.asarray(tokens[s:s + bs]), jnp.asarray(route[s:s + bs]),
                                         cfg=w.backbone_cfg, ffn_dim=self.ffn_dim, impl=self.impl)
            overlaps.append(ov)
            out.append(distill.target_distribution(ov, self.train_cfg.target_temperature))
        ov = jnp.concatenate(overlaps)
        label = (np.asarray(dom) % self.n_experts)[:, None]
        self._stage_info = {"router_target": "distill", **distill.overlap_gap(ov),
                            "teacher_domain_agreement": float(np.mean(np.asarray(jnp.argmax(ov, -1)) == label))}
        return jnp.concatenate(out)

    def _expert_stage(self, round_idx: int, w: ReadMEModel):
        tc, st = self.train_cfg, self.train_cfg.experts
        trainable, frozen = steps.split_params(w.backbone_params, steps.frozen_keys(tc.train_embeddings))
        tx, step_fn = self._expert_tx, self._expert_step_fn(w)
        frozen_step, teacher = frozen, self.teacher_params if self.loss.uses_teacher else None
        if self._expert_pad > 1:  # experts sharded over the mesh: pad E to the expert axis, moments placed
            trainable = step_fn.shard(pad_experts(trainable, self._expert_pad))
            frozen_step = step_fn.shard(frozen)  # replicated once, not on every call
            teacher = step_fn.replicate(teacher)
            opt_state = step_fn.init_opt_state(trainable)
        else:
            opt_state = tx.init(trainable)
        s = 2 * round_idx + 1
        start, rows = 0, []
        if self._expert_pad == 1:  # (the sharded step's padded, placed state is not checkpointed mid-stage)
            start, state, rows = self._mid_restore(s, {"params": trainable, "opt_state": opt_state})
            trainable, opt_state = state["params"], state["opt_state"]
        name = f"round {round_idx} experts"
        bar = tqdm(total=st.steps * st.grad_accum, initial=start * st.grad_accum, desc=name, disable=not self.progress)
        for i in range(start, st.steps):
            batch = self.data.expert_batch(round_idx, i, st.batch_size)
            lr = schedule.lr_at(st, round_idx, tc.lr_decay_per_round, i)
            trainable, opt_state, ms = steps.accumulated_step(step_fn, trainable, frozen_step, opt_state,
                                                              w.router_params, batch, st.grad_accum, lr, teacher)
            for j, m in enumerate(ms):
                self._check(m["loss"], name, i)
                rows.append({"round": round_idx, "stage": "experts", "step": i, "micro": j,
                             "global_step": (round_idx * st.steps + i) * st.grad_accum + j, **m})
            bar.update(st.grad_accum)
            if self._expert_pad == 1:
                self._mid_save(s, i + 1, st.steps, {"params": trainable, "opt_state": opt_state}, rows)
        bar.close()
        if self._expert_pad > 1:
            trainable = unpad_experts(gather_tree(trainable), self.n_experts)
        return w.replace(backbone_params=steps.merge_params(trainable, frozen)), rows

    # ------------------------------------------------------------------ mid-stage checkpoints

    @property
    def _mid_dir(self) -> Path:
        return (self.out_dir / "ckpt_mid").absolute()

    def _mid_save(self, stage: int, next_step: int, n_steps: int, state: dict, rows: list) -> None:
        """Every ``train.checkpoint_every`` optimizer steps (not after the last: the stage checkpoint
        follows), the stage's state, written whole or not at all."""
        every = self.train_cfg.checkpoint_every
        if not every or next_step % every or next_step >= n_steps:
            return
        with atomic_dir(self._mid_dir, overwrite=True) as tmp:
            ck = local_checkpointer()
            ck.save(tmp / "state", savable(state))
            ck.wait_until_finished()
            write_json(tmp / "meta.json", {"stage": stage, "next_step": next_step, "rows": rows,
                                           "stage_info": self._stage_info})

    def _mid_restore(self, stage: int, like: dict) -> tuple[int, dict, list]:
        """``(next step, state, metric rows so far)``: from a mid-stage checkpoint of this stage when
        there is one, else ``(0, like, [])``."""
        meta_path = self._mid_dir / "meta.json"
        if not meta_path.is_file():
            return 0, like, []
        try:
            meta = read_json(meta_path)
        except (OSError, ValueError) as e:
            raise TrainingError(f"{meta_path}: unreadable ({e}); delete {self._mid_dir} to redo the stage") from None
        if meta.get("stage") != stage:
            return 0, like, []
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), like)
        state = local_checkpointer().restore(self._mid_dir / "state", abstract)
        self._stage_info = meta.get("stage_info", {})
        self.log(f"resuming stage {stage} at optimizer step {meta['next_step']} from {self._mid_dir}")
        return int(meta["next_step"]), state, list(meta["rows"])

    # ------------------------------------------------------------------ bookkeeping

    def evaluate(self, w: ReadMEModel) -> dict:
        """Per-domain validation perplexity, router locality and expert load per domain."""
        val = self.data.val_blocks()
        nll = readme_domain_nll(w, self.impl, val, self.eval_batch_size)
        loads, locs, acc = {}, {}, {}
        for d, b in val.items():
            r = routes_for(w, b, self.eval_batch_size)
            loads[d] = expert_load(r, self.n_experts).tolist()
            locs[d] = locality(r)
            if d in self.data.domains:
                acc[d] = route_accuracy(r, self.data.domains.index(d) % self.n_experts)
        return {"val_ppl": {d: math.exp(v) for d, v in nll.items()}, "expert_load": loads,
                "locality": locs, "locality_mean": float(np.mean(list(locs.values()))),
                "router_accuracy": acc, "router_accuracy_mean": float(np.mean(list(acc.values()))) if acc else None}

    def _write_stage_summary(self, s: int, name: str, w: ReadMEModel, rows: list):
        t0 = time.time()
        summary = {"stage": s, "name": name, **self.evaluate(w)}
        if name.endswith("router"):
            summary.update(self._stage_info)
        if rows:
            tail = rows[-max(1, len(rows) // 5):]
            summary["final_loss"] = float(np.mean([r["loss"] for r in tail]))
            if "agreement" in rows[0]:
                summary["agreement"] = float(np.mean([r["agreement"] for r in tail]))
        summary["eval_seconds"] = time.time() - t0
        tag = "initial" if s < 0 else f"{s:02d}"
        (self.metrics_dir / f"stage_{tag}.json").write_text(json.dumps(summary, indent=1))
        with open(self.metrics_dir / f"stage_{tag}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self._events.stage(s, name, rows, summary)
        acc = summary["router_accuracy_mean"]
        self.log(f"[{name}] val ppl " + ", ".join(f"{d} {p:.2f}" for d, p in summary["val_ppl"].items())
                 + f" | locality {summary['locality_mean']:.3f}" + ("" if acc is None else f" | router acc {acc:.3f}"))

    def _restore(self, step: int, like: ReadMEModel) -> ReadMEModel:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"router": like.router_params,
                                                                  "backbone": like.backbone_params})
        got = self._ckpt.restore(step, args=ocp.args.StandardRestore(abstract))
        return like.replace(router_params=got["router"], backbone_params=got["backbone"])


def stage_summaries(out_dir: str | Path) -> list[dict]:
    """All stage summaries written so far, in order (initial first)."""
    d = Path(out_dir) / "metrics"
    files = sorted(d.glob("stage_*.json"), key=lambda p: (p.stem != "stage_initial", p.stem))
    return [json.loads(p.read_text()) for p in files]
