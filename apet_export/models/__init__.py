"""Model families behind a registry (registry.py), one module per family, tiny presets for tests."""
