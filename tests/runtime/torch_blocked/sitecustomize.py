"""Put this folder first on PYTHONPATH and every Python process started with that environment (child
processes included: bench's spawned workers, the server's) cannot import torch, torchvision or
transformers, as on a lean install without the export extra.

Each blocked attempt is written to stderr as `blocked: NAME`, so a test can tell which import was tried."""

import sys

BLOCKED = ("torch", "torchvision", "transformers")


class BlockImports:
    """A meta-path finder consulted before the real ones: a blocked top-level package raises
    ModuleNotFoundError as if it were not installed (tokenizers, onnxruntime, numpy ... import as usual)."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            print(f"blocked: {name}", file=sys.stderr)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, BlockImports())
