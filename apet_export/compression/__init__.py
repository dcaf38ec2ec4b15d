"""Visual-token compression: ApET and baselines, pure batched torch, exportable to ONNX."""

from apet_export.compression.apet import apet_compress, apet_scores, rank_and_merge
from apet_export.compression.approximation import approximation_error
from apet_export.compression.baselines import attention_received, cls_attention_from_qk
from apet_export.compression.registry import METHODS, get_method
from apet_export.compression.types import CompressionOutput
from apet_export.config import ApetConfig

__all__ = [
    "METHODS",
    "ApetConfig",
    "CompressionOutput",
    "apet_compress",
    "apet_scores",
    "approximation_error",
    "attention_received",
    "cls_attention_from_qk",
    "get_method",
    "rank_and_merge",
]
