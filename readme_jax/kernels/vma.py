"""Manual-axis types (the mesh axes a value varies over inside ``jax.shard_map``) for the kernels.

Inside ``shard_map`` every value carries the set of manual mesh axes it varies over (its
``vma``; jax 0.10 calls the type ``ManualAxisType``). Values built from constants (loop carries,
zero buffers, a ``pallas_call``'s ``out_shape``) start invariant, and jax rejects a loop whose carry
changes type or a ``pallas_call`` whose ``out_shape`` names no type. These helpers give such values
the type of the inputs they are computed from. Outside ``shard_map`` every value is invariant over
every axis and each helper is the identity.

A leaf of ``readme_jax.kernels``: imports only jax, so the tile loop (``kernels.xla_tiles``) and
the Pallas kernels (``kernels.expert_ffn_pallas``) share it.
"""

from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; older jax: aval.vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())


def union_axes(*refs) -> frozenset:
    """The manual mesh axes any of ``refs`` varies over."""
    return frozenset().union(*(varying_axes(r) for r in refs))


def vary_like(a, *refs):
    """``a`` marked as varying over every manual mesh axis any of ``refs`` varies over.

    Only adds axes (``pcast`` to varying): ``a`` keeps the axes it already varies over.
    """
    extra = union_axes(*refs) - varying_axes(a)
    return jax.lax.pcast(a, tuple(sorted(extra)), to="varying") if extra else a


def vary_all(*arrays):
    """Every array in ``arrays`` cast to the union of their varying axes (a ``pallas_call``
    whose operands share one type gives its outputs that type too)."""
    axes = union_axes(*arrays)
    return tuple(vary_like(a, *arrays) if varying_axes(a) != axes else a for a in arrays)


def out_struct(shape, dtype, *refs) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` ``out_shape`` varying over the axes of ``refs`` (the kernel's inputs).

    Inside ``shard_map`` (``check_vma=True``, the default) jax requires the manual-axis type on
    ``out_shape``; outside it the type is ignored.
    """
    axes = union_axes(*refs)
    mat_cls = getattr(jax.sharding, "ManualAxisType", None)
    if mat_cls is not None:  # jax 0.10
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat_cls(varying=axes))
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)  # older jax


def sum_to_vma(ct, primal):
    """Sum a cotangent over the manual mesh axes it varies over and its primal does not
    (a primal invariant over an axis was used by every device on it: gradients add up)."""
    extra = varying_axes(ct) - varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


__all__ = ["varying_axes", "union_axes", "vary_like", "vary_all", "out_struct", "sum_to_vma"]
