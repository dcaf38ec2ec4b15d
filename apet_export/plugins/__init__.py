"""Custom ops: ApetScore (apet_score.py, its names in identity.py) with its ONNX schema and onnxruntime reference
kernel; its TensorRT plugin (trt_plugin.py), Triton GPU kernel (triton_apet.py), ahead-of-time PTX form (aot.py)
and the CUDA driver launch of that PTX (cuda_launch.py)."""
