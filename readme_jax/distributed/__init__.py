"""Experts spread over devices: mesh, expert-parallel FFN, sharded training step, checkpoints, multi-host.

See docs/DISTRIBUTED.md.
"""
