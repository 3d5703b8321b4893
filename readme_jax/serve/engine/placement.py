"""Serving on a mesh: the engine's expert weights sharded over the mesh's ``expert`` axis.

``Engine(model, EngineConfig(mesh=MeshConfig(expert=4)))`` (or ``mesh=`` a jax ``Mesh`` with axes
``(data, expert, model)``, ``distributed.make_mesh``) serves with:

* **Placement** (``distributed/mesh.py``'s rule, the one training uses): the backbone's expert
  weights ``wg, wu: [L, E, D, F]``, ``wd: [L, E, F, D]`` have E over ``expert`` and F over
  ``model``; E is padded to a multiple of the expert axis with zero dummy experts
  (``pad_experts``). Everything else (attention, norms, embeddings, LM head, the split layout's
  shared part, the router) and both KV caches are replicated on every device. The router's head
  has the logical E outputs, so no token is ever routed to a dummy expert, and the FFN below runs
  an expert only when a token of the call routes to it, so a dummy is never even read.
* **The expert FFN** (:func:`sharded_experts_ffn`, one ``jax.shard_map`` per layer): every device
  takes all N tokens of the call (they are replicated) and, for each of ITS experts that some
  token routes to (``lax.cond``: the number of experts present is a runtime value), runs that
  expert's SwiGLU on every row keeping its own; the partial outputs are summed with one ``psum``
  over ``(expert, model)``. The shared part runs replicated, once.
* **Communication per step**: one all-reduce per layer of the FFN output ``[N, D]`` float32 over
  the ``expert x model`` devices, and nothing else: no expert weight moves
  (tests/test_serve_mesh.py checks the compiled step holds all-reduces and no all-gather /
  all-to-all / collective-permute).
* **Exactness**: with ``model = 1`` every row of the psum has exactly one non-zero term (its own
  expert's output; the other devices add exact zeros), so tokens, routes and logits are
  bit-identical to the single-device engine. With ``model > 1`` the down projection's partial
  sums are added in another order: float rounding may differ in the last bits.
* **Data axis**: devices along ``data`` hold the same replicas and repeat the same work (KV
  slots are not split over ``data``); use ``data=1`` unless that redundancy is wanted.

Refused at construction (ConfigError): an expert store (``store=``; its host pool is one
device's) and a mesh with devices of other processes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from readme_jax.config import EngineConfig, MeshConfig
from readme_jax.distributed.expert_parallel import W_IN, W_OUT
from readme_jax.distributed.mesh import check_mesh, make_mesh, pad_experts, replicated, shard_tree
from readme_jax.errors import ConfigError
from readme_jax.kernels.vma import vary_like
from readme_jax.model.moe import cond_sum_experts, shared_ffn

EXPERT_AXES = ("expert", "model")  # the FFN's partial outputs are summed over these


def _local_experts(x_ND, r_N, wg, wu, wd):
    """Inside shard_map: this device's experts (``wg: [E_loc, D, F_loc]``) on all rows, each only when
    some row routes to it; then the sum over the expert and model axes."""
    e_loc = wg.shape[0]
    base = lax.axis_index("expert") * e_loc
    y = vary_like(jnp.zeros(x_ND.shape, jnp.float32), wg, wu, wd)
    y = cond_sum_experts(y, x_ND, r_N, ((base + j, (wg[j], wu[j], wd[j])) for j in range(e_loc)))
    return lax.psum(y, EXPERT_AXES)


_FFNS: dict = {}


def sharded_experts_ffn(mesh: Mesh) -> Callable:
    """Read-ME FFN ``(layer params, h_ND, route_N) -> y_ND`` (shared part included) of the engine's
    step with the layer's experts sharded over ``mesh`` (``wg, wu: [E, D, F]`` E over expert, F
    over model). One function per mesh, so engines on one mesh share compilations."""
    if mesh in _FFNS:
        return _FFNS[mesh]
    sm = jax.shard_map(_local_experts, mesh=mesh, in_specs=(P(), P(), W_IN, W_IN, W_OUT), out_specs=P())

    def ffn(lp, h_ND, route_N):
        with jax.named_scope("expert_ffn"):
            y = sm(h_ND, route_N.astype(jnp.int32), lp["wg"], lp["wu"], lp["wd"])
        return shared_ffn(lp, h_ND, y.astype(h_ND.dtype))

    _FFNS[mesh] = ffn
    return ffn


@dataclasses.dataclass(frozen=True)
class MeshPlacement:
    """Where an engine's arrays live on ``mesh`` and the FFN its step functions use (module doc)."""

    mesh: Mesh
    ffn: Callable | None  # the sharded expert FFN (Read-ME), None for a dense model (all replicated)

    def backbone(self, params: dict) -> dict:
        """The backbone's params: experts padded and sharded (Read-ME), the rest replicated."""
        if self.ffn is not None:
            params = pad_experts(params, self.mesh.shape["expert"])
        return shard_tree(params, self.mesh)

    def replicate(self, tree):
        """A tree (router params, KV caches) replicated on every device of the mesh."""
        return jax.device_put(tree, replicated(self.mesh))


def resolve_mesh(mesh) -> Mesh:
    """A jax Mesh from ``EngineConfig.mesh``: a Mesh as it is; a MeshConfig over the first
    ``data x expert x model`` devices (every device when ``data=-1``)."""
    if isinstance(mesh, MeshConfig):
        devices = jax.devices()
        if mesh.data != -1:
            n = mesh.data * mesh.expert * mesh.model
            if n > len(devices):
                raise ConfigError(f"engine.mesh: data={mesh.data} x expert={mesh.expert} x model={mesh.model} = {n} "
                                  f"devices, but only {len(devices)} are visible")
            devices = devices[:n]
        return make_mesh(mesh, devices)
    if isinstance(mesh, Mesh):
        check_mesh(mesh)
        return mesh
    raise ConfigError(f"engine.mesh must be a MeshConfig or a jax Mesh with axes (data, expert, model), got {mesh!r}")


def engine_placement(model, cfg: EngineConfig, store=None) -> MeshPlacement | None:
    """The engine's placement for ``cfg.mesh`` (None: one device); refuses what cannot run on a mesh."""
    if cfg.mesh is None:
        return None
    if store is not None:
        raise ConfigError("engine: an expert store (store=) cannot be combined with engine.mesh: the store's "
                          "host pool feeds one device; serve with the store on one device or on a mesh without it")
    mesh = resolve_mesh(cfg.mesh)
    here = jax.process_index()
    if any(d.process_index != here for d in mesh.devices.flat):
        raise ConfigError(f"engine.mesh spans devices of other processes (mesh {dict(mesh.shape)}); the engine "
                          "serves from one process: build the mesh over jax.local_devices()")
    return MeshPlacement(mesh, sharded_experts_ffn(mesh) if model.is_moe else None)
