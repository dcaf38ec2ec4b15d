"""Run a build: the streaming pipeline (pipeline.py), its backends, KV cache, sampling and detokenisation."""
