"""SPoT: soft prompt transfer on frozen language models (JAX/Flax/Optax)."""

__version__ = "0.1.0"
