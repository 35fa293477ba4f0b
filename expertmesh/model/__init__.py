"""The plain single-device MoE transformer: the reference every deployment must reproduce."""

from expertmesh.model.transformer import MoETransformer, build_model, parameter_bytes, reference_model

__all__ = ["MoETransformer", "build_model", "parameter_bytes", "reference_model"]
