"""One module per backend behind the runner interface of base.py: onnxrt.py, torch.py."""
