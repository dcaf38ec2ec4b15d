"""One deserialized TensorRT engine and what every runner of the tensorrt backend does with it: the
TensorRT-RTX runtime cache, checked input binding against the optimisation profiles, launch, one call.

    RtxRuntimeCache  TensorRT-RTX compiles kernels just in time on first use; the compiled kernels are kept
                     in DIR/engines/<target>/runtime.cache, shared by the backend's engines, loaded at
                     activation (ignored when TensorRT-RTX finds it stale) and saved at deactivation
    Engine           runtime + engine + I/O names; execution contexts (one per profile) on the stream
    bind_inputs()    set_input_shape / set_tensor_address with their results checked: a shape or shape-tensor
                     value outside the profile is an EngineInputError naming the tensor, the shape and the
                     profile's range (from the manifest, which records every profile of every engine)
    run_once()       host feeds up, one launch, host outputs down, on the backend's one stream

Memory and the stream are device_memory.py's (the GPU through Polygraphy's CUDA wrappers, or host memory for
the stand-in engine tests, which run all of this on the CPU); tensorrt itself is the module the backend passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from apet_export.compat import is_tensorrt_rtx
from apet_export.errors import EngineCompatibilityError, EngineInputError, EngineRunError
from apet_export.runtime.backends.device_memory import BufferPool

RUNTIME_CACHE = "runtime.cache"  # beside the engines of one target: DIR/engines/<target>/runtime.cache


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

    def on_host(self, name: str) -> bool:  # shape-tensor inputs (keep) are read from host memory
        return self.engine.get_tensor_location(name) == self.trt.TensorLocation.HOST

    def context(self, profile: int, stream):
        config = self.runtime_cache.runtime_config(self.engine) if self.runtime_cache else None
        context = self.engine.create_execution_context(config) if config is not None else self.engine.create_execution_context()
        if context is None:
            raise EngineRunError(f"TensorRT could not create an execution context for {self.name} (errors above)")
        if not context.set_optimization_profile_async(profile, stream.handle):
            raise EngineRunError(f"TensorRT could not select profile {profile} of {self.name}")
        return context


def check_in_profile(engine: Engine, profile: int, feeds: dict, host_feeds: dict | None = None) -> None:
    """EngineInputError when a shape or a shape-tensor value lies outside the profile's range (what
    set_input_shape would only report as False, and a wrong value as a failure at enqueue). Values are read
    from host_feeds, the host arrays the feeds were copied from: a value the manifest records a range for
    (image_start) may be a tensor the engine reads from device memory."""
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
            number = int(np.asarray((host_feeds or {}).get(name, value)))
            if not low <= number <= high:
                raise EngineInputError(
                    f"{engine.name}: input {name} = {number} is outside the {recorded['name']!r} profile's range "
                    f"[{low}, {high}]: choose a value in that range"
                )


def bind_inputs(engine: Engine, context, profile: int, feeds: dict, host_feeds: dict | None = None) -> None:
    """Input shapes and addresses by name (device arrays, or host numpy arrays for shape tensors), each
    result checked: TensorRT answers False for a shape outside the profile or an address it cannot use.
    host_feeds: the host arrays behind the device feeds (for the profile's value ranges)."""
    check_in_profile(engine, profile, feeds, host_feeds)
    for name, value in feeds.items():
        shape = tuple(int(d) for d in value.shape)
        if not context.set_input_shape(name, shape):
            recorded = engine.profiles[profile] if engine.profiles else {"name": profile, "shapes": {}}
            low, _, high = recorded["shapes"].get(name, ("?", "?", "?"))
            raise EngineInputError(
                f"{engine.name}: TensorRT rejected input {name} of shape {list(shape)} in profile "
                f"{recorded['name']!r} (min {low}, max {high}): see the TensorRT errors above"
            )
        address = value.ctypes.data if isinstance(value, np.ndarray) else value.ptr
        if not context.set_tensor_address(name, address):
            raise EngineInputError(f"{engine.name}: TensorRT rejected the address of input {name} (shape {list(shape)})")


def launch(engine: Engine, context, stream, outputs: dict) -> None:
    """Bind the output arrays and enqueue on the stream; the caller reads the outputs back on that stream."""
    for name, array in outputs.items():
        if not context.set_tensor_address(name, array.ptr):
            raise EngineInputError(f"{engine.name}: TensorRT rejected the address of output {name}")
    if not context.execute_async_v3(stream.handle):
        raise EngineRunError(f"TensorRT failed to run {engine.name} (its errors are printed above)")


def to_engine(engine: Engine, name: str, value: np.ndarray, buffers: BufferPool, stream):
    """A feed in the form the engine reads it: a host int64 array for shape tensors, else the name's device
    buffer holding the value in the engine's dtype for that tensor."""
    if engine.on_host(name):
        return np.require(value, dtype=np.int64, requirements="C")  # 0-d stays 0-d
    return buffers.upload(name, value, engine.numpy_dtype(name), stream)


def run_once(engine: Engine, context, profile: int, stream, feed: dict, buffers: BufferPool) -> dict:
    """Every input of the engine from `feed` (numpy), every output in a buffer of the shape TensorRT infers,
    one launch, read back on the same stream: {output name: numpy array}."""
    feeds = {name: to_engine(engine, name, feed[name], buffers, stream) for name in engine.inputs}
    bind_inputs(engine, context, profile, feeds, feed)  # now the output shapes ([B, keep, H] ...) are known
    outputs = {name: buffers.buffer(name, tuple(context.get_tensor_shape(name)), engine.numpy_dtype(name))
               for name in engine.outputs}
    launch(engine, context, stream, outputs)
    return {name: array.to_host(stream) for name, array in outputs.items()}  # each waits for the stream
