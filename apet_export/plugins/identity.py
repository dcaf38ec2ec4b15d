"""What names the ApetScore op in graphs and plugin registries. Kept apart from apet_score.py (which defines
the op for torch, and imports torch) so that the TensorRT plugin runs in a process without torch."""

OP_TYPE = "ApetScore"
DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python ops
PLUGIN_NAMESPACE = "apet"
PLUGIN_VERSION = "1"
FPS_START_NORM = -1  # fps_start attribute value meaning "largest-norm token"
