"""The RVQ math: model-agnostic, torch only."""

from .kmeans import assign, weighted_kmeans
from .packing import code_dtype, pack, unpack
from .residual import RVQWeight, decode, quantize_weight

__all__ = ["RVQWeight", "assign", "code_dtype", "decode", "pack", "quantize_weight", "unpack", "weighted_kmeans"]
