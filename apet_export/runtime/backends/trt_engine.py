"""One deserialized TensorRT engine and what every runner of the tensorrt backend does with it: the CUDA
stream, the TensorRT-RTX runtime cache, checked input binding against the optimisation profiles, launch.

    RunnerStream     the one CUDA stream a backend captures at activation: every copy, enqueue and
                     synchronisation of its runners happens on it, whatever stream is current later
    RtxRuntimeCache  TensorRT-RTX compiles kernels just in time on first use; the compiled kernels are kept
                     in DIR/engines/<target>/runtime.cache, shared by the backend's engines, loaded at
                     activation (ignored when TensorRT-RTX finds it stale) and saved at deactivation
    Engine           runtime + engine + I/O names; execution contexts (one per profile) on the stream
    bind_inputs()    set_input_shape / set_tensor_address with their results checked: a shape or shape-tensor
                     value outside the profile is an EngineInputError naming the tensor, the shape and the
                     profile's range (from the manifest, which records every profile of every engine)

Everything CUDA-side is imported lazily; the stand-in engine tests run all of this on CPU memory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from apet_export.compat import is_tensorrt_rtx
from apet_export.errors import EngineCompatibilityError, EngineInputError, EngineRunError

RUNTIME_CACHE = "runtime.cache"  # beside the engines of one target: DIR/engines/<target>/runtime.cache


class RunnerStream:
    """A CUDA stream and its raw handle (what execute_async_v3 takes). On the CPU (stand-in engine tests)
    handle 0 and nothing to synchronise."""

    def __init__(self, stream=None):
        self.stream = stream  # torch.cuda.Stream, or None off the GPU
        self.handle = stream.cuda_stream if stream is not None else 0

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def scope(self):
        """Make this the current stream, so torch's copies are ordered with the engines' work."""
        import torch

        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def current_stream(device: str) -> RunnerStream:
    """torch's current stream on `device` ("cuda"), captured once by a backend when it activates."""
    if device != "cuda":
        return RunnerStream()
    import torch

    return RunnerStream(torch.cuda.current_stream())


class RtxRuntimeCache:
    """The TensorRT-RTX runtime cache (IRuntimeCache) of one backend: one cache attached to the runtime
    config of every execution context, persisted in `path`. No-op for full TensorRT, which has none."""

    def __init__(self, trt, path: Path | None):
        self.trt, self.path = trt, Path(path) if path else None
        self.cache = None
        self.loaded = False  # whether the file's kernels were accepted (TensorRT-RTX checks GPU and versions)
        self.enabled = path is not None and is_tensorrt_rtx(trt)

    def runtime_config(self, engine):
        """A runtime config of `engine` with the shared cache attached, or None where there is no cache."""
        if not self.enabled:
            return None
        config = engine.create_runtime_config()
        if self.cache is None:
            self.cache = config.create_runtime_cache()
            if self.path.is_file():
                self.loaded = bool(self.cache.deserialize(self.path.read_bytes()))
        config.set_runtime_cache(self.cache)
        return config

    def save(self) -> None:
        """Write the cache atomically (a reader never sees half a file); best effort: a read-only build
        directory only costs the next run its compilation time."""
        if self.cache is None:
            return
        data = bytes(self.cache.serialize())
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, self.path)
        except OSError:
            temporary.unlink(missing_ok=True)


class Engine:
    """A deserialized engine (with the runtime and logger it needs alive), its I/O names and its profiles
    as recorded in the manifest (dicts: name, shapes {tensor: [min, opt, max]}, values {tensor: [min, opt, max]})."""

    def __init__(self, trt, path: Path, profiles: list[dict] | None = None, runtime_cache: RtxRuntimeCache | None = None):
        from apet_export.export.trt_network import make_logger

        self.trt, self.path, self.profiles = trt, Path(path), profiles or []
        self.runtime_cache = runtime_cache
        self.logger = make_logger(trt, echo=True)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineCompatibilityError(
                f"{trt.__name__} {trt.__version__} could not load {self.path} (built for another version or GPU): "
                f"rebuild with `apet-export engine {self.path.parent.parent.parent} --target current`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"  # sm89/llm.engine

    def numpy_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def torch_dtype(self, name: str):
        import torch

        return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                np.dtype(np.bool_): torch.bool}[self.numpy_dtype(name)]

    def on_host(self, name: str) -> bool:  # shape-tensor inputs (keep) are read from host memory
        return self.engine.get_tensor_location(name) == self.trt.TensorLocation.HOST

    def context(self, profile: int, stream: RunnerStream):
        config = self.runtime_cache.runtime_config(self.engine) if self.runtime_cache else None
        context = self.engine.create_execution_context(config) if config is not None else self.engine.create_execution_context()
        if context is None:
            raise EngineRunError(f"TensorRT could not create an execution context for {self.name} (errors above)")
        if not context.set_optimization_profile_async(profile, stream.handle):
            raise EngineRunError(f"TensorRT could not select profile {profile} of {self.name}")
        return context


def check_in_profile(engine: Engine, profile: int, feeds: dict) -> None:
    """EngineInputError when a shape or a shape-tensor value lies outside the profile's range (what
    set_input_shape would only report as False, and a wrong value as a failure at enqueue)."""
    if not engine.profiles:
        return
    recorded = engine.profiles[profile]
    for name, value in feeds.items():
        shape = tuple(int(d) for d in value.shape)
        if name in recorded.get("shapes", {}):
            low, _, high = (tuple(s) for s in recorded["shapes"][name])
            if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=False)):
                raise EngineInputError(
                    f"{engine.name}: input {name} of shape {list(shape)} is outside the {recorded['name']!r} profile "
                    f"(min {list(low)}, max {list(high)}): keep requests within the engine's profiles, or rebuild the "
                    f"engines with a larger range (`apet-export engine --max-batch / --max-context`)"
                )
        if name in recorded.get("values", {}):
            low, _, high = recorded["values"][name]
            number = int(np.asarray(value.cpu() if hasattr(value, "cpu") else value))
            if not low <= number <= high:
                raise EngineInputError(
                    f"{engine.name}: input {name} = {number} is outside the {recorded['name']!r} profile's range "
                    f"[{low}, {high}]: choose a value in that range"
                )


def bind_inputs(engine: Engine, context, profile: int, feeds: dict) -> None:
    """Input shapes and addresses by name (device tensors, or host arrays for shape tensors), each result
    checked: TensorRT answers False for a shape outside the profile or an address it cannot use."""
    check_in_profile(engine, profile, feeds)
    for name, value in feeds.items():
        shape = tuple(int(d) for d in value.shape)
        if not context.set_input_shape(name, shape):
            recorded = engine.profiles[profile] if engine.profiles else {"name": profile, "shapes": {}}
            low, _, high = recorded["shapes"].get(name, ("?", "?", "?"))
            raise EngineInputError(
                f"{engine.name}: TensorRT rejected input {name} of shape {list(shape)} in profile "
                f"{recorded['name']!r} (min {low}, max {high}): see the TensorRT errors above"
            )
        address = value.ctypes.data if isinstance(value, np.ndarray) else value.data_ptr()
        if not context.set_tensor_address(name, address):
            raise EngineInputError(f"{engine.name}: TensorRT rejected the address of input {name} (shape {list(shape)})")


def launch(engine: Engine, context, stream: RunnerStream, outputs: dict) -> None:
    """Bind the output tensors and enqueue on the stream; the caller synchronises that same stream."""
    for name, tensor in outputs.items():
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise EngineInputError(f"{engine.name}: TensorRT rejected the address of output {name}")
    if not context.execute_async_v3(stream.handle):
        raise EngineRunError(f"TensorRT failed to run {engine.name} (its errors are printed above)")


def to_engine(engine: Engine, name: str, value: np.ndarray, device: str):
    """A feed in the form the engine reads it: a host int64 array for shape tensors, else a device tensor
    of the engine's dtype for that tensor."""
    import torch

    value = np.require(value, requirements="C")  # ascontiguousarray would make a 0-d keep 1-d
    if engine.on_host(name):
        return value.astype(np.int64)
    return torch.from_numpy(value).to(device, engine.torch_dtype(name))


def run_once(engine: Engine, context, profile: int, stream: RunnerStream, feed: dict, device: str) -> dict:
    """Every input of the engine from `feed` (numpy), every output allocated at the shape TensorRT infers,
    one launch, synchronised: {output name: numpy array}."""
    import torch

    with stream.scope():
        feeds = {name: to_engine(engine, name, feed[name], device) for name in engine.inputs}
        bind_inputs(engine, context, profile, feeds)  # now the output shapes ([B, keep, H] ...) are known
        outputs = {
            name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=engine.torch_dtype(name), device=device)
            for name in engine.outputs
        }
        launch(engine, context, stream, outputs)
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
