"""TensorRT backend: the engines of `apet-export engine` (vision + ApET, LLM) on this machine's GPU.

    select_engines(): manifest["engines"] → the engine of each artifact for this GPU, after checking the
                      TensorRT module/version that built them and the target (compute capability)
    TrtVisionRunner:  {pixel_values, keep} → {image_embeds, keep_index, scores}   (keep: shape tensor)
    TrtLlmRunner:     one execution context per profile (prefill, decode); the KV cache stays on the GPU

KV cache without host round trips: per layer, key and value each own two flat device buffers of the full
context (ping-pong). A step binds past_* to the first P*... elements of one buffer, as a contiguous
[B, Hkv, P, Dh] tensor, and present_* to the other, where the graph writes [B, Hkv, P+S, Dh]; then the
two swap. Only the step's embeddings go up and its logits come down (the sampler runs on the host).

Everything CUDA-side (tensorrt, torch.cuda buffers) is imported when a runner activates, so this module
imports on any machine. Tested without a GPU: engine selection, version and target checks, and the runners
themselves against a stand-in engine on CPU memory (tests/runtime/test_trt_backend.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from apet_export.errors import (
    ApetExportError,
    ArtifactError,
    DeviceError,
    EngineCompatibilityError,
)
from apet_export.manifest import Manifest
from apet_export.runtime.backends.base import Backend


def current_target() -> str:
    """'sm90' for this machine's GPU, or DeviceError naming the way out."""
    from apet_export.export.tensorrt import current_gpu_target

    target = current_gpu_target()
    if target is None:
        raise DeviceError(
            "the tensorrt backend needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False): "
            "run on a GPU machine with a CUDA build of torch, or use --backend onnxruntime"
        )
    return target


def select_engines(build_dir: Path, manifest: Manifest, trt_name: str, trt_version: str, target: str) -> dict[str, dict]:
    """artifact name -> its engine record for `target`, checked against the loading TensorRT."""
    record = manifest.engines
    if not record or not record.get("files"):
        raise ArtifactError(
            f"{build_dir} has no TensorRT engines: build them with `apet-export engine {build_dir} --target current`"
        )
    built = record["tensorrt"]
    if (built["module"], built["version"]) != (trt_name, trt_version):
        raise EngineCompatibilityError(
            f"the engines in {build_dir} were built by {built['module']} {built['version']} and this is "
            f"{trt_name} {trt_version} (engines load only in the version that built them): rebuild with "
            f"`apet-export engine {build_dir} --target current`"
        )
    files = {f["artifact"]: f for f in record["files"] if f["target"] == target}
    if not files:
        raise EngineCompatibilityError(
            f"the engines in {build_dir} are for {', '.join(record['targets'])} and this GPU is {target}: build "
            f"engines for it with `apet-export engine {build_dir} --target current`"
        )
    for entry in files.values():
        if not (Path(build_dir) / entry["path"]).is_file():
            raise ArtifactError(f"{entry['path']} is listed in the manifest but missing: rerun `apet-export engine`")
    return files


def unavailable_reason(build_dir: Path, manifest: Manifest) -> str | None:
    """Why the tensorrt backend cannot run this build here (for parity/bench to say), or None."""
    import torch

    from apet_export.compat import import_tensorrt

    if not torch.cuda.is_available():  # checked first: cheap, and the usual reason on CPU machines
        return "no CUDA GPU"
    try:
        trt = import_tensorrt()
    except ApetExportError:
        return "TensorRT not installed"
    try:
        select_engines(build_dir, manifest, trt.__name__, trt.__version__, current_target())
    except ApetExportError as error:
        return str(error)
    return None


def available_engines(build_dir: Path, manifest: Manifest) -> dict[str, str]:
    """{artifact: engine path} for this GPU; call after unavailable_reason() returned None."""
    from apet_export.compat import import_tensorrt

    trt = import_tensorrt()
    files = select_engines(build_dir, manifest, trt.__name__, trt.__version__, current_target())
    return {name: entry["path"] for name, entry in files.items()}


def vision_runner(build_dir: Path, manifest: Manifest, artifact: str = "vision") -> TrtVisionRunner:
    """A (not yet active) runner of this GPU's engine of a vision artifact, for parity checks."""
    from apet_export.compat import import_tensorrt

    trt = import_tensorrt()
    files = select_engines(build_dir, manifest, trt.__name__, trt.__version__, current_target())
    if artifact == "vision_plugin":
        _register_plugin_or_fail(trt, artifact)
    path = Path(build_dir) / files[artifact]["path"]
    return TrtVisionRunner(trt, path, manifest.files[artifact].inputs, name=f"tensorrt:{artifact}")


def _register_plugin_or_fail(trt, artifact: str) -> None:
    from apet_export.export.tensorrt import register_plugins

    reason = register_plugins(trt)
    if reason:
        raise ArtifactError(f"cannot run the {artifact} engine: {reason}")


class _Engine:
    """A deserialized engine (with the runtime and logger it needs alive) and its I/O names."""

    def __init__(self, trt, path: Path):
        from apet_export.export.trt_network import make_logger

        self.trt, self.path = trt, path
        self.logger = make_logger(trt, echo=True)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineCompatibilityError(
                f"{trt.__name__} {trt.__version__} could not load {path} (built for another version or GPU): "
                f"rebuild with `apet-export engine {path.parent.parent.parent} --target current`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def torch_dtype(self, name: str):
        import torch

        return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                np.dtype(np.bool_): torch.bool}[np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))]

    def on_host(self, name: str) -> bool:  # shape-tensor inputs (keep) are read from host memory
        return self.engine.get_tensor_location(name) == self.trt.TensorLocation.HOST

    def context(self, profile: int, stream: int):
        context = self.engine.create_execution_context()
        context.set_optimization_profile_async(profile, stream)
        return context


def _stream(device: str) -> int:
    """The CUDA stream handle the engines run on (torch's current stream; 0 off the GPU, for tests)."""
    import torch

    return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.current_stream().synchronize()


def _bind_inputs(context, feeds: dict) -> None:
    """Input shapes and addresses by name: device tensors, or host arrays for shape tensors (keep)."""
    for name, value in feeds.items():
        context.set_input_shape(name, tuple(value.shape))
        context.set_tensor_address(name, value.ctypes.data if isinstance(value, np.ndarray) else value.data_ptr())


def _launch(context, stream, outputs: dict) -> None:
    """Bind the output tensors and enqueue; the caller synchronises."""
    for name, tensor in outputs.items():
        context.set_tensor_address(name, tensor.data_ptr())
    if not context.execute_async_v3(stream):
        raise ApetExportError("TensorRT failed to run the engine (its errors are printed above)")


class TrtVisionRunner(BaseRunner):
    """inputs: the artifact's input specs from the manifest (what Polygraphy checks feeds against).
    device: "cuda" (tests pass "cpu" with a stand-in engine)."""

    def __init__(self, trt, path: Path, inputs, name: str = "tensorrt-vision", device: str = "cuda"):
        super().__init__(name=name, prefix="trt-vision-runner")
        self.trt, self.path, self.inputs, self.device = trt, path, inputs, device

    def activate_impl(self):
        self.stream = _stream(self.device)
        self.engine = _Engine(self.trt, self.path)
        self.context = self.engine.context(0, self.stream)

    def get_input_metadata_impl(self):
        metadata = TensorMetadata()
        for spec in self.inputs:
            metadata.add(spec.name, np.dtype(spec.dtype), spec.shape)
        return metadata

    def infer_impl(self, feed_dict):
        import torch

        start = time.perf_counter()
        feeds = {}
        for name in self.engine.inputs:
            value = np.require(feed_dict[name], requirements="C")  # ascontiguousarray would make keep 1-d
            if self.engine.on_host(name):  # the budget: a shape tensor, read from host memory
                feeds[name] = value.astype(np.int64)
            else:
                feeds[name] = torch.from_numpy(value).to(self.device, self.engine.torch_dtype(name))
        _bind_inputs(self.context, feeds)  # now the output shapes ([B, keep, H] ...) are known
        outputs = {
            name: torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.engine.torch_dtype(name), device=self.device)
            for name in self.engine.outputs
        }
        _launch(self.context, self.stream, outputs)
        _synchronize(self.device)
        self.inference_time = time.perf_counter() - start
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def deactivate_impl(self):
        self.context = self.engine = None


class DeviceKVCache:
    """past_*/present_* ping-pong buffers on the GPU (see the module docstring)."""

    def __init__(
        self, names: list[str], batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device: str = "cuda"
    ):
        import torch

        self.names, self.length, self.capacity = names, 0, capacity
        self.shape = (batch, kv_heads, head_dim)
        size = batch * kv_heads * capacity * head_dim
        self.buffers = [(torch.empty(size, dtype=dtype, device=device), torch.empty(size, dtype=dtype, device=device))
                        for _ in names]
        self.current = 0  # which buffer of each pair holds the past

    def view(self, index: int, which: int, length: int):
        batch, heads, head_dim = self.shape
        return self.buffers[index][which][: batch * heads * length * head_dim].view(batch, heads, length, head_dim)

    def bindings(self, new_tokens: int) -> tuple[dict, dict]:
        """(past_* inputs [B, Hkv, P, Dh], present_* outputs [B, Hkv, P+S, Dh]) for a step of new_tokens."""
        total = self.length + new_tokens
        if total > self.capacity:
            raise ApetExportError(f"the KV cache holds {self.capacity} tokens; this step needs {total}")
        past = {f"past_{n}": self.view(i, self.current, self.length) for i, n in enumerate(self.names)}
        present = {f"present_{n}": self.view(i, 1 - self.current, total) for i, n in enumerate(self.names)}
        return past, present

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        self.current = 1 - self.current


class TrtLlmRunner(BaseRunner):
    """llm engine; profile "prefill" for the prompt (no cache), "decode" for one token at a time."""

    def __init__(self, trt, path: Path, inputs, profiles: list[str], name: str = "tensorrt-llm", device: str = "cuda"):
        super().__init__(name=name, prefix="trt-llm-runner")
        self.trt, self.path, self.inputs, self.profile_names, self.device = trt, path, inputs, profiles, device

    def activate_impl(self):
        self.stream = _stream(self.device)
        self.engine = _Engine(self.trt, self.path)
        self.contexts = {name: self.engine.context(i, self.stream) for i, name in enumerate(self.profile_names)}
        self.logits = None  # [B, V] device buffer, allocated once per batch size

    def get_input_metadata_impl(self):  # the cache is bound separately (device buffers)
        metadata = TensorMetadata()
        for spec in self.inputs:
            if not spec.name.startswith("past_"):
                metadata.add(spec.name, np.dtype(spec.dtype), spec.shape)
        return metadata

    def infer_impl(self, feed_dict, cache: DeviceKVCache = None):
        import torch

        start = time.perf_counter()
        new_tokens = feed_dict["inputs_embeds"].shape[1]
        phase = "decode" if new_tokens == 1 and cache.length > 0 and "decode" in self.contexts else "prefill"
        context = self.contexts[phase]
        feeds = {name: torch.from_numpy(np.ascontiguousarray(feed_dict[name])).to(self.device, self.engine.torch_dtype(name))
                 for name in ("inputs_embeds", "attention_mask", "position_ids")}
        past, present = cache.bindings(new_tokens)
        feeds.update(past)
        shape = (feeds["inputs_embeds"].shape[0], self.engine.engine.get_tensor_shape("logits")[-1])
        if self.logits is None or tuple(self.logits.shape) != shape:
            self.logits = torch.empty(shape, dtype=self.engine.torch_dtype("logits"), device=self.device)
        _bind_inputs(context, feeds)
        _launch(context, self.stream, {"logits": self.logits, **present})
        cache.advance(new_tokens)
        logits = self.logits.float().cpu().numpy()  # synchronises the stream
        self.inference_time = time.perf_counter() - start
        return logits, cache

    def deactivate_impl(self):
        self.contexts = self.engine = self.logits = None


class TrtBackend(Backend):
    name = "tensorrt"

    def __init__(self, build_dir, manifest, vision_graph: str = "vision"):
        super().__init__(build_dir, manifest)
        self.vision_graph = vision_graph

    def activate(self) -> TrtBackend:
        from safetensors.numpy import load_file

        from apet_export.compat import import_tensorrt

        target = current_target()
        trt = import_tensorrt()
        files = select_engines(self.build_dir, self.manifest, trt.__name__, trt.__version__, target)
        for artifact in (self.vision_graph, "llm"):
            if artifact not in files:
                raise ArtifactError(
                    f"{self.build_dir} has no {artifact} engine for {target}: build it with "
                    f"`apet-export engine {self.build_dir} --target current`"
                )
        if self.vision_graph == "vision_plugin":
            _register_plugin_or_fail(trt, self.vision_graph)
        vision = self.vision_graph
        self.vision = TrtVisionRunner(trt, self.build_dir / files[vision]["path"], self.manifest.files[vision].inputs)
        self.vision.activate()
        llm = files["llm"]
        self.llm = TrtLlmRunner(
            trt, self.build_dir / llm["path"], self.manifest.files["llm"].inputs, [p["name"] for p in llm["profiles"]]
        )
        self.llm.activate()
        self.table = load_file(str(self.manifest.file(self.build_dir, "embeddings")))["embed_tokens"]
        return self

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.table[token_ids]

    def new_cache(self, batch: int) -> DeviceKVCache:
        import torch

        dims = self.manifest.dims
        names = [f"{kind}_{i}" for i in range(dims["num_layers"]) for kind in ("key", "value")]
        capacity = self.manifest.engines["settings"]["max_context"]
        dtype = torch.float16 if self.manifest.precision == "fp16" else torch.float32
        return DeviceKVCache(names, batch, dims["num_kv_heads"], dims["head_dim"], capacity, dtype)
