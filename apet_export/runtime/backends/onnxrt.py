"""onnxruntime backend: vision.onnx (or vision.plugin.onnx) and llm.onnx on the CPU provider."""

from __future__ import annotations

import time

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner

from apet_export.runtime.backends.base import Backend
from apet_export.runtime.cache import KVCache
from apet_export.runtime.sessions import onnxruntime_session


class OnnxrtLlmRunner(BaseRunner):
    """llm.onnx with the cache fed back: present_* of one step become past_* of the next."""

    def __init__(self, path, name: str = "onnxruntime-llm", fuse_qdq: bool = True):
        super().__init__(name=name, prefix="onnxrt-llm-runner")
        self.path, self.session, self.fuse_qdq = path, None, fuse_qdq

    def activate_impl(self):
        self.session = onnxruntime_session(self.path, fuse_qdq=self.fuse_qdq)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        metadata = TensorMetadata()
        for value in self.session.get_inputs():
            metadata.add(value.name, None, value.shape)
        return metadata

    def infer_impl(self, feed_dict, cache: KVCache = None):
        start = time.perf_counter()
        outputs = self.session.run(self.output_names, {**feed_dict, **cache.feed()})
        self.inference_time = time.perf_counter() - start
        return outputs[0].astype(np.float32), KVCache(outputs[1:], cache.capacity)

    def deactivate_impl(self):
        self.session = None


class OnnxrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, build_dir, manifest, vision_graph: str = "vision"):
        super().__init__(build_dir, manifest)
        self.vision_graph = vision_graph

    def activate(self) -> OnnxrtBackend:
        from safetensors.numpy import load_file

        vision_path = self.manifest.file(self.build_dir, self.vision_graph)
        fuse_qdq = self.manifest.precision != "fp8"  # FP8 QDQ runs as simulated quantisation on the CPU
        self.vision = OnnxrtRunner(
            lambda: onnxruntime_session(
                vision_path, spin=False, apet_score=self.vision_graph == "vision_plugin", fuse_qdq=fuse_qdq
            ),
            name=f"onnxruntime:{vision_path.name}",
        )
        self.vision.activate()
        if self.manifest.stage2:  # llm_a + stage2 + llm_b
            from apet_export.runtime.two_stage import onnxrt_two_stage_runner

            self.llm = onnxrt_two_stage_runner(self.build_dir, self.manifest)
        else:
            self.llm = OnnxrtLlmRunner(self.manifest.file(self.build_dir, "llm"), fuse_qdq=fuse_qdq)
        self.llm.activate()
        self.table = load_file(str(self.manifest.file(self.build_dir, "embeddings")))["embed_tokens"]
        return self

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.table[token_ids]

    def new_cache(self, batch: int) -> KVCache:
        if self.manifest.stage2:
            return self.llm.new_cache(batch)
        return KVCache.empty(self.manifest, batch)
