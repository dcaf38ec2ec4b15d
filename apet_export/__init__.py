"""apet-export: deploy vision-language models with ApET visual-token compression."""

__version__ = "0.1.0"
