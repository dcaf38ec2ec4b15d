"""TensorRT backend: the engines of `apet-export engine` (vision + ApET, LLM) on this machine's GPU.

    load_tensorrt():  manifest["engines"] → the engine of each artifact for this GPU, loaded with the
                      TensorRT module the manifest records for them, version and target checked
    TrtVisionRunner:  {pixel_values, keep} → {image_embeds, keep_index, scores}   (keep: shape tensor)
    TrtDecoder:       one decoder engine, one execution context per profile (prefill, decode, extend);
                      TrtLlmRunner drives `llm`, two_stage.TwoStageLlmRunner drives llm_a → stage2 → llm_b
                      (a TrtDecoder and KV cache per part, TrtStage2 between them)
    one CUDA stream per backend (device_memory.py), created at activation and destroyed at deactivation:
    every runner copies, enqueues and synchronises on it; on TensorRT-RTX one runtime cache of
    JIT-compiled kernels, kept per target (trt_engine.py)

KV cache without host round trips: per layer, key and value each own two flat device buffers of the full
context (ping-pong), all in one allocation per cache. A step binds past_* to the first B*Hkv*P*Dh elements
of one buffer, as a contiguous [B, Hkv, P, Dh] array, and present_* to the other, where the graph writes
[B, Hkv, P+S, Dh]; then the two swap. Only the step's embeddings go up and its logits come down (the
sampler runs on the host); the step's feeds and logits live in buffers reused across steps. On a two-stage
build llm_a's hidden states [B, S, H] also come down and go up to stage2 / llm_b (the runner the other
backends share works on host arrays; for decode steps that is one row per step).

Neither torch nor transformers: device memory and the stream are Polygraphy's CUDA wrappers of libcudart
(device_memory.py), the GPU check asks the CUDA runtime (export/cuda_device.py), and tensorrt is imported
when the backend activates, so this module imports on any machine. Tested without a GPU: engine selection,
version and target checks, and the runners themselves against stand-in engines, on host memory and on a
stand-in libcudart under Polygraphy's wrapper (tests/runtime/test_trt_backend.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from apet_export.errors import ArtifactError, DeviceError, EngineCompatibilityError, EngineInputError
from apet_export.export.cuda_device import probe_gpu
from apet_export.manifest import Manifest
from apet_export.runtime.backends.base import Backend
from apet_export.runtime.backends.device_memory import BufferPool, device_memory
from apet_export.runtime.backends.trt_engine import (
    RUNTIME_CACHE,
    Engine,
    RtxRuntimeCache,
    bind_inputs,
    launch,
    run_once,
)
from apet_export.runtime.two_stage import TwoStageLlmRunner


def current_target() -> str:
    """'sm90' for this machine's GPU, or DeviceError naming the way out."""
    target, missing = probe_gpu()
    if target is None:
        raise DeviceError(
            f"the tensorrt backend needs a CUDA GPU and finds none ({missing}): run on a machine with an NVIDIA "
            f"GPU, its driver and a CUDA runtime library (libcudart) that driver supports, or use --backend onnxruntime"
        )
    return target


def select_engines(build_dir: Path, manifest: Manifest, trt_name: str, trt_version: str, target: str) -> dict[str, dict]:
    """artifact name -> its engine record for `target`, checked against the loading TensorRT."""
    from apet_export.export.tensorrt import earlier_engines

    entries = earlier_engines(manifest.engines)
    if not entries:
        raise ArtifactError(
            f"{build_dir} has no TensorRT engines: build them with `apet-export engine {build_dir} --target current`"
        )
    files = {e["artifact"]: e for e in entries if e["target"] == target}
    if not files:
        targets = sorted({e["target"] for e in entries})
        raise EngineCompatibilityError(
            f"the engines in {build_dir} are for {', '.join(targets)} and this GPU is {target}: build "
            f"engines for it with `apet-export engine {build_dir} --target current`"
        )
    for name, entry in files.items():
        built = entry["tensorrt"]
        if (built["module"], built["version"]) != (trt_name, trt_version):
            raise EngineCompatibilityError(
                f"the {target} {name} engine in {build_dir} was built by {built['module']} {built['version']} and "
                f"this is {trt_name} {trt_version} (engines load only in the version that built them): rebuild "
                f"with `apet-export engine {build_dir} --target current`"
            )
        if not (Path(build_dir) / entry["path"]).is_file():
            raise ArtifactError(f"{entry['path']} is listed in the manifest but missing: rerun `apet-export engine`")
    return files


def engines_for_target(build_dir: Path, manifest: Manifest, target: str) -> list[dict]:
    """The engine entries of the manifest for `target`; ArtifactError / EngineCompatibilityError naming the
    command that builds them."""
    from apet_export.export.tensorrt import earlier_engines

    entries = earlier_engines(manifest.engines)
    if not entries:
        raise ArtifactError(
            f"{build_dir} has no TensorRT engines: build them with `apet-export engine {build_dir} --target current`"
        )
    mine = [e for e in entries if e["target"] == target]
    if not mine:
        targets = sorted({e["target"] for e in entries})
        raise EngineCompatibilityError(
            f"the engines in {build_dir} are for {', '.join(targets)} and this GPU is {target}: build "
            f"engines for it with `apet-export engine {build_dir} --target current`"
        )
    return mine


def load_tensorrt(build_dir: Path, manifest: Manifest, target: str):
    """(trt module, {artifact: engine entry}) for `target`, importing exactly the TensorRT module the manifest
    records for those engines (`tensorrt` and TensorRT-RTX engines do not load in each other)."""
    from apet_export.compat import import_tensorrt

    modules = sorted({e["tensorrt"]["module"] for e in engines_for_target(build_dir, manifest, target)})
    if len(modules) > 1:
        raise EngineCompatibilityError(
            f"the {target} engines in {build_dir} were built by different TensorRT modules ({', '.join(modules)}): "
            f"rebuild them all with one, `apet-export engine {build_dir} --target current`"
        )
    trt = import_tensorrt(prefer=modules[0])  # MissingDependencyError naming the install where it is absent
    return trt, select_engines(build_dir, manifest, trt.__name__, trt.__version__, target)


def tensorrt_skip_reason(build_dir: Path, manifest: Manifest, require: bool = False) -> str | None:
    """Why parity / bench do not run TensorRT here (no GPU, no engines for this GPU), or None when they run
    it. Engines for this GPU that cannot be used (their TensorRT module missing or another version, a file
    missing) raise: that is a broken setup, not a skip. require=True (--require-tensorrt, for GPU CI) turns
    a skip into DeviceError too."""
    from apet_export.export.tensorrt import earlier_engines

    reason = None
    target, missing = probe_gpu()
    if target is None:  # checked first: cheap, and the usual reason on CPU machines
        reason = f"no CUDA GPU: {missing}"
    else:
        entries = earlier_engines(manifest.engines)
        if not entries:
            reason = f"no TensorRT engines in the build: `apet-export engine {build_dir} --target current`"
        elif not [e for e in entries if e["target"] == target]:
            built = ", ".join(sorted({e["target"] for e in entries}))
            reason = f"no engines for this GPU ({target}; the build has {built}): `apet-export engine {build_dir} --target current`"
        else:
            load_tensorrt(build_dir, manifest, target)  # engines for this GPU: they must be usable
    if reason and require:
        raise DeviceError(f"--require-tensorrt: the TensorRT engines were not run ({reason})")
    return reason


def available_engines(build_dir: Path, manifest: Manifest) -> dict[str, str]:
    """{artifact: engine path} for this GPU; call after tensorrt_skip_reason() returned None."""
    _, files = load_tensorrt(build_dir, manifest, current_target())
    return {name: entry["path"] for name, entry in files.items()}


def vision_runner(build_dir: Path, manifest: Manifest, artifact: str = "vision") -> TrtVisionRunner:
    """A (not yet active) runner of this GPU's engine of a vision artifact, for parity checks."""
    trt, files = load_tensorrt(build_dir, manifest, current_target())
    if artifact == "vision_plugin":
        _register_plugin_or_fail(trt, artifact)
    entry = files[artifact]
    return TrtVisionRunner(trt, Path(build_dir) / entry["path"], manifest.files[artifact].inputs,
                           profiles=entry.get("profiles"), name=f"tensorrt:{artifact}")


def _register_plugin_or_fail(trt, artifact: str) -> None:
    from apet_export.export.tensorrt import register_plugins

    reason = register_plugins(trt)
    if reason:
        raise ArtifactError(f"cannot run the {artifact} engine: {reason}")


class TrtVisionRunner(BaseRunner):
    """inputs: the artifact's input specs from the manifest (what Polygraphy checks feeds against); profiles:
    the engine's profiles as the manifest records them (for range errors). device: "cuda" (tests pass "cpu"
    with a stand-in engine); stream: the backend's (None: one of its own from activation to deactivation)."""

    def __init__(self, trt, path: Path, inputs, profiles=None, name: str = "tensorrt-vision", device: str = "cuda",
                 stream=None, runtime_cache: RtxRuntimeCache | None = None):
        super().__init__(name=name, prefix="trt-vision-runner")
        self.trt, self.path, self.inputs, self.profiles, self.device = trt, path, inputs, profiles, device
        self.stream, self.runtime_cache = stream, runtime_cache
        self.own_stream = None

    def activate_impl(self):
        memory = device_memory(self.device)
        if self.stream is None:
            self.stream = self.own_stream = memory.stream()
        self.buffers = BufferPool(memory)  # pixel_values, image_embeds ... reused across images
        self.engine = Engine(self.trt, self.path, self.profiles, self.runtime_cache)
        self.context = self.engine.context(0, self.stream)

    def get_input_metadata_impl(self):
        metadata = TensorMetadata()
        for spec in self.inputs:
            metadata.add(spec.name, np.dtype(spec.dtype), spec.shape)
        return metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = run_once(self.engine, self.context, 0, self.stream, feed_dict, self.buffers)
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate_impl(self):
        self.context = self.engine = self.buffers = None  # the contexts before the memory they were bound to
        if self.own_stream is not None:
            self.own_stream.free()
            self.stream = self.own_stream = None


class DeviceKVCache:
    """past_*/present_* ping-pong buffers on the GPU (see the module docstring): one allocation
    [names, 2, B*Hkv*capacity*Dh] of the engine's past_* dtype (numpy), uninitialised (a step reads only
    what an earlier step wrote)."""

    def __init__(
        self, names: list[str], batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device: str = "cuda"
    ):
        self.names, self.length, self.capacity = names, 0, capacity
        self.shape = (batch, kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.buffer_size = batch * kv_heads * capacity * head_dim  # elements of one buffer
        self.memory = device_memory(device).allocate((len(names), 2, self.buffer_size), self.dtype)
        self.current = 0  # which buffer of each pair holds the past

    def view(self, index: int, which: int, length: int):
        """Buffer `which` of name `index` as the contiguous [B, Hkv, length, Dh] array at its start."""
        batch, heads, head_dim = self.shape
        return self.memory.view((batch, heads, length, head_dim), offset=(2 * index + which) * self.buffer_size)

    def bindings(self, new_tokens: int) -> tuple[dict, dict]:
        """(past_* inputs [B, Hkv, P, Dh], present_* outputs [B, Hkv, P+S, Dh]) for a step of new_tokens."""
        total = self.length + new_tokens
        if total > self.capacity:
            raise EngineInputError(
                f"the KV cache holds {self.capacity} tokens; this step needs {total} (the engines' max context is "
                f"{self.capacity}): shorten the request, or rebuild the engines with a larger --max-context"
            )
        past = {f"past_{n}": self.view(i, self.current, self.length) for i, n in enumerate(self.names)}
        present = {f"present_{n}": self.view(i, 1 - self.current, total) for i, n in enumerate(self.names)}
        return past, present

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        self.current = 1 - self.current


def step_phase(new_tokens: int, past: int) -> str:
    """The optimisation profile of a decoder step (export/trt_profiles.py): "prefill" on an empty cache,
    "decode" for one token on a cache, "extend" for several tokens on a cache (chunked prefill, video
    frames arriving into the cache)."""
    if past == 0:
        return "prefill"
    return "decode" if new_tokens == 1 else "extend"


class TrtDecoder:
    """One decoder engine (llm, or a two-stage part llm_a / llm_b) with one execution context per profile:
    feed {inputs_embeds | hidden_states [B, S, H], attention_mask [B, P+S], position_ids} + its own
    DeviceKVCache -> (logits [B, V] | hidden_states [B, S, H] as numpy, the cache)."""

    def __init__(self, trt, path: Path, spec, entry: dict, device: str, stream,
                 runtime_cache: RtxRuntimeCache | None = None):
        self.trt, self.path, self.entry, self.device, self.stream = trt, path, entry, device, stream
        self.runtime_cache = runtime_cache
        self.input_name, self.output_name = spec.inputs[0].name, spec.outputs[0].name
        past = [t for t in spec.inputs if t.name.startswith("past_")]  # [B, Hkv, P, Dh], global layer indices
        self.kv_names = [t.name.removeprefix("past_") for t in past]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.engine = None

    def activate(self) -> None:
        self.engine = Engine(self.trt, self.path, self.entry.get("profiles"), self.runtime_cache)
        self.contexts = {p["name"]: (i, self.engine.context(i, self.stream)) for i, p in enumerate(self.engine.profiles)}
        self.buffers = BufferPool(device_memory(self.device))  # the step's feeds and output, reused across steps

    def deactivate(self) -> None:
        self.engine = self.contexts = self.buffers = None

    def new_cache(self, batch: int) -> DeviceKVCache:
        """The cache in the dtype the engine's past_* tensors have (an fp16 graph may keep some in fp32)."""
        dtype = self.engine.numpy_dtype(f"past_{self.kv_names[0]}")
        capacity = self.entry["settings"]["max_context"]
        return DeviceKVCache(self.kv_names, batch, self.kv_heads, self.head_dim, capacity, dtype, self.device)

    def __call__(self, feed_dict: dict, cache: DeviceKVCache):
        new_tokens = feed_dict[self.input_name].shape[1]
        phase = step_phase(new_tokens, cache.length)
        if phase not in self.contexts:
            raise EngineInputError(
                f"{self.engine.name}: a step of {new_tokens} tokens on a cache of {cache.length} needs the {phase!r} "
                f"profile, which this engine (built before it existed) lacks: rebuild it with `apet-export engine "
                f"{self.path.parent.parent.parent} --target {self.path.parent.name}`"
            )
        profile, context = self.contexts[phase]
        feeds = {name: self.buffers.upload(name, feed_dict[name], self.engine.numpy_dtype(name), self.stream)
                 for name in (self.input_name, "attention_mask", "position_ids")}
        past, present = cache.bindings(new_tokens)
        feeds.update(past)
        bind_inputs(self.engine, context, profile, feeds, feed_dict)
        output_shape = tuple(context.get_tensor_shape(self.output_name))
        output = self.buffers.buffer(self.output_name, output_shape, self.engine.numpy_dtype(self.output_name))
        launch(self.engine, context, self.stream, {self.output_name: output, **present})
        cache.advance(new_tokens)
        return output.to_host(self.stream), cache  # waits for the stream the step was enqueued on


class TrtLlmRunner(BaseRunner):
    """llm engine of a one-stage build: profile "prefill" for the prompt (no cache), "decode" for one token at
    a time, "extend" for several tokens onto a cache."""

    def __init__(self, decoder: TrtDecoder, inputs, name: str = "tensorrt-llm"):
        super().__init__(name=name, prefix="trt-llm-runner")
        self.decoder, self.inputs = decoder, inputs

    def activate_impl(self):
        self.decoder.activate()

    def get_input_metadata_impl(self):  # the cache is bound separately (device buffers)
        metadata = TensorMetadata()
        for spec in self.inputs:
            if not spec.name.startswith("past_"):
                metadata.add(spec.name, np.dtype(spec.dtype), spec.shape)
        return metadata

    def new_cache(self, batch: int) -> DeviceKVCache:
        return self.decoder.new_cache(batch)

    def infer_impl(self, feed_dict, cache: DeviceKVCache = None):
        start = time.perf_counter()
        logits, cache = self.decoder(feed_dict, cache)
        self.inference_time = time.perf_counter() - start
        return logits.astype(np.float32), cache

    def deactivate_impl(self):
        self.decoder.deactivate()


class TrtStage2:
    """stage2 engine: (hidden [B, L1, H], image_start, image_length, keep) -> compressed_states [B, L2, H]."""

    def __init__(self, trt, path: Path, entry: dict, device: str, stream,
                 runtime_cache: RtxRuntimeCache | None = None):
        self.trt, self.path, self.entry, self.device, self.stream = trt, path, entry, device, stream
        self.runtime_cache = runtime_cache

    def activate(self) -> None:
        self.engine = Engine(self.trt, self.path, self.entry.get("profiles"), self.runtime_cache)
        self.context = self.engine.context(0, self.stream)
        self.buffers = BufferPool(device_memory(self.device))

    def deactivate(self) -> None:
        self.engine = self.context = self.buffers = None

    def __call__(self, hidden: np.ndarray, start: int, length: int, keep: int) -> np.ndarray:
        feed = {"hidden_states": hidden, "image_start": np.array(start, np.int64),
                "image_length": np.array(length, np.int64), "keep": np.array(keep, np.int64)}
        return run_once(self.engine, self.context, 0, self.stream, feed, self.buffers)["compressed_states"]


def trt_two_stage_runner(trt, build_dir: Path, manifest: Manifest, files: dict, device: str, stream,
                         runtime_cache: RtxRuntimeCache | None = None) -> TwoStageLlmRunner:
    """llm_a -> stage2 -> llm_b engines, a KV cache per part, driven by the runner the other backends use."""
    def part(name):
        return TrtDecoder(trt, Path(build_dir) / files[name]["path"], manifest.files[name], files[name], device,
                          stream, runtime_cache)

    first, second = part("llm_a"), part("llm_b")
    stage2 = TrtStage2(trt, Path(build_dir) / files["stage2"]["path"], files["stage2"], device, stream, runtime_cache)
    for piece in (first, stage2, second):
        piece.activate()

    def second_logits(feed, cache):
        logits, cache = second(feed, cache)
        return logits.astype(np.float32), cache

    return TrtTwoStageRunner(
        first, stage2, second_logits, lambda batch: (first.new_cache(batch), second.new_cache(batch)),
        name="tensorrt:llm_a+stage2+llm_b", parts=(first, stage2, second),
    )


class TrtTwoStageRunner(TwoStageLlmRunner):
    """TwoStageLlmRunner whose deactivation releases the part engines (their contexts hold device memory)."""

    def __init__(self, *args, parts=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.parts = parts

    def deactivate_impl(self):
        for part in self.parts:
            part.deactivate()


class TrtBackend(Backend):
    name = "tensorrt"

    def __init__(self, build_dir, manifest, vision_graph: str = "vision", device: str = "cuda"):
        super().__init__(build_dir, manifest)
        self.vision_graph, self.device = vision_graph, device
        self.runtime_cache = self.stream = None

    def activate(self) -> TrtBackend:
        from apet_export.export.tensorrt import ENGINES_DIR
        from apet_export.runtime.embeddings import embedding_table

        target = current_target()
        trt, files = load_tensorrt(self.build_dir, self.manifest, target)
        llm_parts = ("llm_a", "stage2", "llm_b") if self.manifest.stage2 else ("llm",)
        missing = [name for name in (self.vision_graph, *llm_parts) if name not in files]
        if missing:
            artifacts = " ".join(f"--artifact {name}" for name in missing)
            raise ArtifactError(
                f"{self.build_dir} has no {', '.join(missing)} engine(s) for {target} (it has {', '.join(sorted(files))}): "
                f"build them with `apet-export engine {self.build_dir} --target current {artifacts}`"
            )
        if self.vision_graph == "vision_plugin":
            _register_plugin_or_fail(trt, self.vision_graph)
        self.stream = device_memory(self.device).stream()  # of every runner, copy and synchronisation
        self.runtime_cache = RtxRuntimeCache(trt, self.build_dir / ENGINES_DIR / target / RUNTIME_CACHE)
        vision = files[self.vision_graph]
        self.vision = TrtVisionRunner(
            trt, self.build_dir / vision["path"], self.manifest.files[self.vision_graph].inputs,
            profiles=vision.get("profiles"), device=self.device, stream=self.stream, runtime_cache=self.runtime_cache,
        )
        self.vision.activate()
        if self.manifest.stage2:
            self.llm = trt_two_stage_runner(trt, self.build_dir, self.manifest, files, self.device, self.stream,
                                            self.runtime_cache)
        else:
            decoder = TrtDecoder(trt, self.build_dir / files["llm"]["path"], self.manifest.files["llm"], files["llm"],
                                 self.device, self.stream, self.runtime_cache)
            self.llm = TrtLlmRunner(decoder, self.manifest.files["llm"].inputs)
        self.llm.activate()
        self.table = embedding_table(self.manifest.file(self.build_dir, "embeddings"))  # [V, H], mapped
        return self

    def deactivate(self) -> None:
        super().deactivate()
        if self.runtime_cache is not None:
            self.runtime_cache.save()  # the kernels TensorRT-RTX compiled for this GPU, for the next run
        if self.stream is not None:  # after the runners: nothing is enqueued on it any more
            self.stream.free()
            self.stream = None

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.table[token_ids]

    def new_cache(self, batch: int):
        return self.llm.new_cache(batch)  # a DeviceKVCache, or a StagedCache of one per part
