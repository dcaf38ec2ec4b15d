"""Visual-token compression: ApET and baselines, pure batched torch, exportable to ONNX.

The names below load on first use (PEP 562): the package also holds the budget rules (budget.py, plain
Python), which a runtime without torch imports."""

from importlib import import_module

_WHERE = {
    "apet_compress": "apet", "apet_scores": "apet", "rank_and_merge": "apet",
    "approximation_error": "approximation",
    "attention_received": "baselines", "cls_attention_from_qk": "baselines",
    "METHODS": "registry", "get_method": "registry",
    "CompressionOutput": "types",
}

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


def __getattr__(name: str):
    if name == "ApetConfig":
        from apet_export.config import ApetConfig

        return ApetConfig
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
