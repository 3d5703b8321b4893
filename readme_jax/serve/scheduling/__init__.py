"""Scheduling: requests and their pending work, the continuous-batching scheduler and its policies,
and the expert cache policies (no model; serve/__init__ lists the rooms)."""
