"""Custom ops: ApetScore (apet_score.py) with its ONNX schema and onnxruntime reference kernel; its
TensorRT plugin (trt_plugin.py), Triton GPU kernel (triton_apet.py) and ahead-of-time PTX form (aot.py)."""
