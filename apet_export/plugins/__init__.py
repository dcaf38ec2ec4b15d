"""Custom ops: ApetScore (apet_score.py) with its ONNX schema and onnxruntime reference kernel."""
