"""INT8/FP8 calibration of the graphs (not implemented yet: a later issue)."""
