"""The real server (`apet-export serve`, Ray Serve) on a free loopback port: one for the whole session."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the serve tests need Ray Serve: pip install -e '.[dev]'")

from apet_export.serve.client import LocalServer  # noqa: E402

API_KEY = "test-key-0123456789"
MAX_BODY_MB = 4


def ray_processes(ray_dir: Path) -> list[int]:
    """Processes whose command line names this server's private Ray directory (raylet, GCS, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(ray_dir).encode() in command:
                found.append(int(entry.name))
    return found


class Server(LocalServer):
    """The server with its own Ray directory (RAY_TMPDIR), so that its Ray processes can be found afterwards."""

    def __init__(self, build: Path, *options: str):
        self.ray_dir = Path(tempfile.mkdtemp(prefix="ar", dir="/tmp"))  # short: Ray's socket paths have a limit
        super().__init__(build, *options, log=self.ray_dir.with_suffix(".log"),
                         env={"RAY_TMPDIR": str(self.ray_dir), "RAY_USAGE_STATS_ENABLED": "0"})

    def leftover_processes(self, settle: float = 10.0) -> list[int]:
        deadline = time.monotonic() + settle
        while (left := ray_processes(self.ray_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # never leave them running for the rest of the session, whatever the test says
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def finish(self) -> tuple[int, list[int], str]:
        """Stop with SIGTERM: (exit status, Ray processes left behind, log tail); removes its files."""
        try:
            status = self.stop()
        finally:
            left = self.leftover_processes()
            log = self.log_tail()
            shutil.rmtree(self.ray_dir, ignore_errors=True)
            self.log.unlink(missing_ok=True)
        return status, left, log


@pytest.fixture(scope="session")
def server(llava_build):
    """The tiny LLaVA build served with an API key and a 4 MiB body limit. Teardown: SIGTERM must exit 0 and
    leave no Ray process behind."""
    server = Server(llava_build, "--api-key", API_KEY, "--max-body-mb", str(MAX_BODY_MB), "--max-batch", "16")
    try:
        server.wait_healthy()
    except BaseException:
        server.finish()
        raise
    yield server
    status, left, log = server.finish()
    assert status == 0, f"the server exited with {status} after SIGTERM:\n{log}"
    assert not left, f"Ray processes left running after the server stopped: {left}"
