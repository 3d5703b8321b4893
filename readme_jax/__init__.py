"""readme-jax: Read-ME router-decoupled mixture of experts on JAX."""

__version__ = "0.1.0"
