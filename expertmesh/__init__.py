"""expertmesh: an inference engine for MoE transformers with large cross-node expert parallelism."""

__version__ = "0.1.0"
