"""Simulation and benchmark tools: synthetic workloads, the model-free simulator with a cost model,
simulated host-device transfers, metrics and plots, and ``serve-bench`` (serve/sim/bench.py)."""
