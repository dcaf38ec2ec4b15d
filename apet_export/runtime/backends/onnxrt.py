"""onnxruntime backend: vision.onnx (or vision.plugin.onnx) and the LLM on the CPU provider.

The LLM graph is llm.cpu.onnx when the build has it (export/cpu_graph.py: the KV cache is a preallocated
buffer the graph writes into, bound as both past_* and present_* with IO binding), else llm.onnx (the cache
fed back: present_* of one step become past_* of the next, each step a copy of the whole cache)."""

from __future__ import annotations

import time

import numpy as np
from polygraphy.backend.base import BaseRunner

from apet_export.errors import InvalidInputError
from apet_export.runtime.backends.base import Backend
from apet_export.runtime.cache import KVCache, PreallocatedKVCache
from apet_export.runtime.sessions import onnxruntime_session


class OnnxrtVisionRunner(BaseRunner):
    """vision.onnx (or vision.plugin.onnx): numpy feeds in, numpy outputs by name. Polygraphy's OnnxrtRunner does
    the same but asks on every call whether a feed is a torch tensor, which imports torch where it is installed
    (seconds and ~200 MiB on a runtime that never uses it)."""

    def __init__(self, make_session, name: str = "onnxruntime-vision"):
        super().__init__(name=name, prefix="onnxrt-vision-runner")
        self.make_session, self.session = make_session, None

    def activate_impl(self):
        self.session = self.make_session()
        self.output_names = [o.name for o in self.session.get_outputs()]

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        metadata = TensorMetadata()
        for value in self.session.get_inputs():
            metadata.add(value.name, None, value.shape)
        return metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = self.session.run(self.output_names, feed_dict)
        self.inference_time = time.perf_counter() - start
        return dict(zip(self.output_names, outputs, strict=True))

    def deactivate_impl(self):
        self.session = None


class OnnxrtLlmRunner(BaseRunner):
    """llm.onnx with the cache fed back: present_* of one step become past_* of the next."""

    def __init__(self, path, name: str = "onnxruntime-llm", fuse_qdq: bool = True, threads: int | None = None):
        super().__init__(name=name, prefix="onnxrt-llm-runner")
        self.path, self.session, self.fuse_qdq, self.threads = path, None, fuse_qdq, threads

    ARENA = True  # onnxruntime's CPU memory arena (runtime/sessions.py)

    def activate_impl(self):
        self.session = onnxruntime_session(self.path, fuse_qdq=self.fuse_qdq, threads=self.threads, arena=self.ARENA)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def new_cache(self, manifest, batch: int) -> KVCache:
        return KVCache.empty(manifest, batch)

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


class OnnxrtInPlaceLlmRunner(OnnxrtLlmRunner):
    """llm.cpu.onnx: each cache buffer is bound as past_i and present_i, so the graph's TensorScatter writes the
    step's entries into it in place. The binding of the cache (2 x layers names) and of a logits buffer [B, V]
    is made once per cache allocation; a step binds only its three inputs."""

    PREFILL_CHUNK = 128  # prompt tokens per run (Qwen2-0.5B shape, 596 tokens: peak RSS 1569 MiB unchunked, 1497 at 128)
    # No arena: a prompt's chunks run on cache buffers of growing capacity, so their activations differ in size
    # from run to run, and the arena kept a block of each size (Qwen2-0.5B shape, 596 tokens: peak RSS 1502 ->
    # 1486 MiB fp32, 437 -> 420 MiB INT4; prefill and decode times within the machine's noise)
    ARENA = False

    def activate_impl(self):
        super().activate_impl()
        self.cache_names = [
            (value.name, value.name.replace("past_", "present_", 1))
            for value in self.session.get_inputs() if value.name.startswith("past_")
        ]
        logits = self.session.get_outputs()[0]  # [B, V], V static
        self.vocab_size = logits.shape[1]
        self.logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        self.bound = None  # (the cache's OrtValues it was made for, binding, logits buffer)

    def new_cache(self, manifest, batch: int) -> PreallocatedKVCache:
        return PreallocatedKVCache.empty(manifest, batch)

    def binding(self, cache: PreallocatedKVCache):
        import onnxruntime as ort

        if self.bound is None or self.bound[0] is not cache.ort_values:
            binding = self.session.io_binding()
            logits = np.empty((cache.buffers[0].shape[0], self.vocab_size), self.logits_dtype)  # [B, V]
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            for (past, present), value in zip(self.cache_names, cache.ort_values, strict=True):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self.bound = (cache.ort_values, binding, logits)
        return self.bound[1], self.bound[2]

    def infer_impl(self, feed_dict, cache: PreallocatedKVCache = None):
        """feed_dict: inputs_embeds [B, S, H], attention_mask [B, P+S], position_ids [B, S] (or [3, B, S]).
        A prompt longer than PREFILL_CHUNK runs as consecutive chunks onto the same cache (the graph takes S new
        tokens after P cached ones, whatever S is): the same result, with the activations of one chunk at a
        time (the attention scores alone are [B, Hq, S, C] floats). The cache grows chunk by chunk: onnxruntime's
        Attention (the last layer's, and every layer's where the graph has no GroupQueryAttention) scores every
        key of the buffer, masked or not, so a buffer sized for the whole prompt would score each chunk against
        the keys of the chunks after it too (596 tokens in chunks of 128: 1.6 times the keys)."""
        start = time.perf_counter()
        embeds, mask, positions = (feed_dict[name] for name in ("inputs_embeds", "attention_mask", "position_ids"))
        batch, new_tokens = embeds.shape[:2]
        past = cache.length
        # GroupQueryAttention (export/cpu_fusions.py) takes several tokens after cached ones at batch 1 only: a
        # batch's prompt runs whole, and a batch continues its cache one token at a time.
        if batch > 1 and past > 0 and new_tokens > 1:
            raise InvalidInputError(
                f"{self.path.name} takes {new_tokens} new tokens after {past} cached ones for one row at a time, not for "
                f"{batch}: continue a batch one token per step, or run each row on a cache of its own"
            )
        chunk_length = self.PREFILL_CHUNK if batch == 1 else max(new_tokens, 1)
        for begin in range(0, new_tokens, chunk_length):
            end = min(begin + chunk_length, new_tokens)
            cache.reserve(end - begin)  # a larger buffer (a copy of the entries so far) only when they do not fit
            binding, logits = self.binding(cache)
            chunk = {"inputs_embeds": embeds[:, begin:end], "attention_mask": mask[:, : past + end],
                     "position_ids": positions[..., begin:end]}
            for name, array in chunk.items():  # replaces the previous run's binding of the name
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            self.session.run_with_iobinding(binding)
            cache.length = past + end
        self.inference_time = time.perf_counter() - start
        return logits.astype(np.float32), cache  # a copy: the buffer is the next step's output


def llm_runner(build_dir, manifest, cpu_form: bool = True, threads: int | None = None, fuse_qdq: bool = True):
    """The runner of a one-stage build's LLM: llm.cpu.onnx when the build has it and cpu_form, else llm.onnx."""
    if cpu_form and "llm_cpu" in manifest.files:
        path = manifest.file(build_dir, "llm_cpu")
        return OnnxrtInPlaceLlmRunner(path, name=f"onnxruntime:{path.name}", fuse_qdq=fuse_qdq, threads=threads)
    path = manifest.file(build_dir, "llm")
    return OnnxrtLlmRunner(path, name=f"onnxruntime:{path.name}", fuse_qdq=fuse_qdq, threads=threads)


class OnnxrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, build_dir, manifest, vision_graph: str = "vision"):
        super().__init__(build_dir, manifest)
        self.vision_graph = vision_graph

    def activate(self) -> OnnxrtBackend:
        from apet_export.runtime.embeddings import embedding_table

        vision_path = self.manifest.file(self.build_dir, self.vision_graph)
        fuse_qdq = self.manifest.precision != "fp8"  # FP8 QDQ runs as simulated quantisation on the CPU
        self.vision = OnnxrtVisionRunner(
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
            self.llm = llm_runner(self.build_dir, self.manifest, fuse_qdq=fuse_qdq)
        self.llm.activate()
        self.table = embedding_table(self.manifest.file(self.build_dir, "embeddings"))  # [V, H], mapped
        return self

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.table[token_ids]

    def new_cache(self, batch: int) -> KVCache:
        if self.manifest.stage2:
            return self.llm.new_cache(batch)
        return self.llm.new_cache(self.manifest, batch)
