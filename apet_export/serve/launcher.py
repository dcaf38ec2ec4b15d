"""Start serving a build on Ray Serve and stop cleanly.

Without --address a private Ray instance starts on this machine, on loopback, with a small object store
and no dashboard; with --address the command joins a running cluster (`ray start --head` on one machine,
`ray start --address HEAD:6379` on the others) and places its replicas across it. SIGTERM or SIGINT:
the application is deleted (its proxy stops routing to it; each replica finishes its in-flight requests
for up to --drain-timeout seconds, then is stopped), Serve and the private Ray instance shut down, and
the command exits 0.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from apet_export.errors import InvalidInputError
from apet_export.serve.app import ModelOptions

APP_NAME = "apet"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # requests carry a few pictures; Ray's default would take 30% of memory


@dataclass(frozen=True)
class ServeOptions:
    model: ModelOptions
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    address: str | None = None  # a running Ray cluster ("auto", "HOST:6379"); None: a private local instance
    cpus_per_replica: float | None = None  # None: this machine's cores shared by the replicas (local), 1 (cluster)
    drain_timeout_s: float = 30.0
    ray_env: dict = field(default_factory=dict)


def check_options(options: ServeOptions) -> None:
    """Bad options and a damaged build are reported before Ray starts."""
    from apet_export.manifest import load_manifest

    if options.replicas < 1:
        raise InvalidInputError(f"--replicas must be >= 1, got {options.replicas}")
    if options.model.max_batch < 1:
        raise InvalidInputError(f"--max-batch must be >= 1, got {options.model.max_batch}")
    if not 0 < options.port < 65536:
        raise InvalidInputError(f"--port must be in 1..65535, got {options.port}")
    manifest = load_manifest(Path(options.model.build_dir))
    manifest.file(Path(options.model.build_dir), "llm_a" if manifest.stage2 else "llm")  # it must generate


def replica_cpus(options: ServeOptions) -> float:
    if options.cpus_per_replica is not None:
        return options.cpus_per_replica
    if options.address is not None:
        return 1.0
    return max(0.1, (os.cpu_count() or 1) / options.replicas)


def start_ray(options: ServeOptions) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is reported anywhere
    runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", **options.ray_env}}
    if "PYTHONPATH" in os.environ:  # replicas import this package from where the command does
        runtime_env["env_vars"].setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
    if options.address is not None:
        ray.init(address=options.address, runtime_env=runtime_env, logging_level="WARNING")
        return
    cpus = max(os.cpu_count() or 1, int(options.replicas * replica_cpus(options) + 0.999))
    ray.init(
        num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, _node_ip_address="127.0.0.1",
        runtime_env=runtime_env, logging_level="WARNING", configure_logging=True,
    )


def deploy(options: ServeOptions):
    from ray import serve

    from apet_export.serve.app import ChatModel

    quiet = {"log_level": "WARNING"}  # warnings and failed requests on the console; Ray's session folder has the rest
    serve.start(http_options={"host": options.host, "port": options.port}, proxy_location="HeadOnly",
                logging_config=quiet)
    deployment = serve.deployment(
        ChatModel, name="ChatModel", num_replicas=options.replicas,
        max_ongoing_requests=options.model.max_batch,  # beyond this Ray queues requests for the next free slot
        ray_actor_options={"num_cpus": replica_cpus(options)},
        graceful_shutdown_timeout_s=options.drain_timeout_s, graceful_shutdown_wait_loop_s=0.5,
    )
    return serve.run(deployment.bind(options.model), name=APP_NAME, route_prefix="/", blocking=False,
                     logging_config=quiet)


def serve_until_stopped(options: ServeOptions, say=print) -> None:
    """Deploy, announce the URL, block until SIGTERM/SIGINT, then drain and shut down."""
    import ray
    from ray import serve

    check_options(options)
    stop = threading.Event()
    try:
        start_ray(options)
        # after ray.init, which installs its own SIGTERM handler (exit at once): drain first instead
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        deploy(options)
        say(f"serving {Path(options.model.build_dir).resolve().name} on http://{options.host}:{options.port}/v1 "
            f"({options.replicas} replica(s), vision batches up to {options.model.max_batch}); SIGTERM or Ctrl-C stops")
        while not stop.wait(1.0):
            pass
        say("stopping: draining in-flight requests")
        serve.delete(APP_NAME)  # no new requests reach the replicas; in-flight ones finish within the drain timeout
        if options.address is None:  # a shared cluster keeps its Serve instance (other applications may use it)
            serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()  # a private instance stops all its processes; a cluster is only disconnected from
    say("stopped")
