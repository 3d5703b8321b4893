"""The one expert-FFN entry point every MoE layer calls.

``expert_ffn(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, impl=...)`` computes, for each token t with
``e = expert_T[t]``::

    y[t] = (silu(x[t] @ Wg[e]) * (x[t] @ Wu[e])) @ Wd[e]

with float32 accumulation; the hidden ``silu(g) * u`` is rounded to the compute dtype before the
down projection (as the dense ``layers.swiglu`` does) and the output has x's dtype.

Impls (same semantics, same gradients):

- ``"reference"``: a loop over experts, each computing its FFN on every token and keeping its own
  rows (E dense FFNs). The oracle for tests; differentiable by plain autodiff.
- ``"xla"``: tokens sorted by expert (stable), grouped matmuls over the contiguous groups, then
  unsorted; every permutation's backward is the inverse gather (``custom_vjp``, no scatter).
  Two strategies (``kernels.xla_tiles.xla_ffn``): a loop over expert tiles of a tile-padded
  layout (default off TPU) or ``lax.ragged_dot`` (default on TPU).
- ``"pallas"``: the fused gathered-expert FFN kernel (``readme_jax.kernels.expert_ffn_pallas``).

Expert ids outside ``[0, E)``: with concrete (host) ids the call raises ``ShapeError``; under
``jit`` the ids are traced and cannot be checked, so such tokens are *dropped* -- they join no
group and their output row is exactly 0 (gradients through them are 0). This is the same in
every impl (``kernels.grouping`` defines it).

Layering: this module is the dispatcher; the impls live in ``readme_jax.kernels`` (the lower
layer, which never imports ``readme_jax.ops``): ``kernels.xla_tiles`` (the XLA impl and the tile
loop), ``kernels.expert_ffn_pallas`` (the Pallas kernel), ``kernels.grouping`` (group metadata).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.config import IMPLS
from readme_jax.errors import ShapeError
from readme_jax.kernels.expert_ffn_pallas import pallas_ffn
from readme_jax.kernels.xla_tiles import compute_dtype, xla_ffn



# --------------------------------------------------------------------------- validation


def _validate(x, expert, wg, wu, wd, impl: str) -> None:
    where = "expert_ffn"
    if impl not in IMPLS:
        raise ShapeError(f"{where}: impl must be one of {IMPLS}, got {impl!r}")
    if getattr(x, "ndim", 0) < 1:
        raise ShapeError(f"{where}: x must have shape [T, D] (or [..., D]), got shape {np.shape(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"{where}: x must be floating point, got dtype {x.dtype}")
    if wg.ndim != 3:
        raise ShapeError(f"{where}: wg must have shape [E, D, F], got shape {tuple(wg.shape)}")
    E, D, F = wg.shape
    if tuple(wu.shape) != (E, D, F):
        raise ShapeError(f"{where}: wu shape {tuple(wu.shape)} disagrees with wg shape "
                         f"{tuple(wg.shape)}; expected both [E, D, F]")
    if tuple(wd.shape) != (E, F, D):
        raise ShapeError(f"{where}: wd shape {tuple(wd.shape)} disagrees with wg shape "
                         f"{tuple(wg.shape)}; expected wd [E, F, D] = {(E, F, D)}")
    for name, w in (("wg", wg), ("wu", wu), ("wd", wd)):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ShapeError(f"{where}: {name} must be floating point, got dtype {w.dtype}")
    if x.shape[-1] != D:
        raise ShapeError(f"{where}: x shape {tuple(x.shape)} has model dim {x.shape[-1]} but wg "
                         f"shape {tuple(wg.shape)} has D={D}")
    eshape = tuple(np.shape(expert))
    if eshape != tuple(x.shape[:-1]):
        raise ShapeError(f"{where}: expert ids shape {eshape} does not match x shape "
                         f"{tuple(x.shape)}; expected ids of shape {tuple(x.shape[:-1])}")
    edtype = getattr(expert, "dtype", None) or np.asarray(expert).dtype
    if not jnp.issubdtype(edtype, jnp.integer):
        raise ShapeError(f"{where}: expert ids must be integers, got dtype {edtype}")
    if not isinstance(expert, jax.core.Tracer):
        ids = np.asarray(expert)
        bad = ids[(ids < 0) | (ids >= E)]
        if bad.size:
            raise ShapeError(f"{where}: expert id {int(bad[0])} is out of range [0, {E}) "
                             f"(E={E} experts; {bad.size} bad ids in total)")


# --------------------------------------------------------------------------- public entry


def expert_ffn(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, *, impl: str = "xla", **impl_kw):
    """Top-1 expert SwiGLU: ``y[t] = (silu(x Wg[e]) * (x Wu[e])) Wd[e]`` with ``e = expert_T[t]``.

    ``x_TD``: ``[T, D]`` (or ``[..., D]`` with ``expert_T`` of shape ``[...]``); weights
    ``wg, wu: [E, D, F]``, ``wd: [E, F, D]``. Returns ``[T, D]`` (x's leading shape) in x's
    dtype. ``impl_kw`` go to the impl: ``strategy``/``tm`` for ``"xla"`` (see
    ``kernels.xla_tiles.xla_ffn``), block
    sizes and ``interpret`` for ``"pallas"`` (see ``kernels.expert_ffn_pallas.pallas_ffn``).
    Jit-able (static T, dynamic group sizes) and differentiable w.r.t. x and all three weights.
    """
    with jax.named_scope("expert_ffn"):
        _validate(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, impl)
        lead = x_TD.shape[:-1]
        x = x_TD.reshape(-1, x_TD.shape[-1])
        e = jnp.asarray(expert_T).reshape(-1)
        if impl == "reference":
            y = reference_ffn(x, e, wg_EDF, wu_EDF, wd_EFD, **impl_kw)
        elif impl == "xla":
            y = xla_ffn(x, e, wg_EDF, wu_EDF, wd_EFD, **impl_kw)
        else:
            y = pallas_ffn(x, e, wg_EDF, wu_EDF, wd_EFD, **impl_kw)
        return y.reshape(*lead, y.shape[-1])


# --------------------------------------------------------------------------- reference


def reference_ffn(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD):
    """Oracle: every expert's dense FFN on every token, each keeping only its own rows."""
    E = wg_EDF.shape[0]
    cdt = compute_dtype(x_TD, wg_EDF)
    x = x_TD.astype(cdt)
    y = jnp.zeros((x.shape[0], wd_EFD.shape[2]), jnp.float32)
    for e in range(E):
        g = jnp.dot(x, wg_EDF[e].astype(cdt), preferred_element_type=jnp.float32)
        u = jnp.dot(x, wu_EDF[e].astype(cdt), preferred_element_type=jnp.float32)
        h = (jax.nn.silu(g) * u).astype(cdt)
        ye = jnp.dot(h, wd_EFD[e].astype(cdt), preferred_element_type=jnp.float32)
        y = y + jnp.where((expert_T == e)[:, None], ye, 0.0)
    return y.astype(x_TD.dtype)


