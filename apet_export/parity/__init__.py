"""Comparisons of the artifacts against eager PyTorch (Polygraphy Comparator) and their report."""
