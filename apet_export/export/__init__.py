"""torch -> ONNX: vision graph with the ApET stage (vision.py), LLM decoder (llm.py), the build (build.py)."""
