"""manifest.json: the single source of truth of a build (files, I/O names, dynamic axes, budgets)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from apet_export import __version__
from apet_export.config import ApetConfig, ArtifactSpec
from apet_export.errors import ArtifactError, ManifestVersionError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class Manifest:
    source: dict  # {"model": preset name or path, "sha256": content hash of the checkpoint}
    family: str
    dims: dict  # image_size, num_image_tokens, vision_hidden, text_hidden (+ LLM dims)
    method: str  # apet | visionzip | none
    compression: ApetConfig
    budget: dict  # {"default": T, "min": M + 1, "max": N}
    precision: str
    opset: int
    files: dict[str, ArtifactSpec]  # "vision", "vision_plugin", "llm", ...
    plugin: dict = field(default_factory=dict)  # ApetScore op identity, when vision_plugin exists
    notes: list[str] = field(default_factory=list)  # what was not built and why
    stage2: dict = field(default_factory=dict)  # ApET stage 2 in the LLM: {"layer": K, ...}; {} = one stage
    tool_versions: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)  # TensorRT engines (`apet-export engine`): files, version, settings
    quantization: dict = field(default_factory=dict)  # calibrated builds: precision, method, samples, cache keys
    schema_version: int = SCHEMA_VERSION
    apet_export_version: str = __version__

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "apet_export_version": self.apet_export_version,
            "source": self.source,
            "family": self.family,
            "dims": self.dims,
            "method": self.method,
            "compression": self.compression.to_dict(),
            "budget": self.budget,
            "precision": self.precision,
            "opset": self.opset,
            "files": {name: spec.to_dict() for name, spec in self.files.items()},
            "plugin": self.plugin,
            "notes": self.notes,
            "stage2": self.stage2,
            "tool_versions": self.tool_versions,
            "engines": self.engines,
            **({"quantization": self.quantization} if self.quantization else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestVersionError(
                f"manifest schema version {version} (written by apet-export "
                f"{data.get('apet_export_version', '?')}) is not the supported version {SCHEMA_VERSION}: "
                f"rebuild with `apet-export build`, or use the apet-export version that wrote it"
            )
        fields = dict(data)
        fields["compression"] = ApetConfig.from_dict(data["compression"])
        fields["files"] = {name: ArtifactSpec.from_dict(spec) for name, spec in data["files"].items()}
        return cls(**fields)

    def write(self, directory: Path) -> None:
        """Atomically: a reader never sees a half-written manifest."""
        path = Path(directory) / MANIFEST_NAME
        temporary = path.with_name(f".{MANIFEST_NAME}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(temporary, path)

    def file(self, directory: Path, name: str) -> Path:
        """Absolute path of artifact `name`, checked to exist."""
        if name not in self.files:
            raise ArtifactError(f"the build in {directory} has no {name!r} artifact (it has: {', '.join(self.files)})")
        path = Path(directory) / self.files[name].path
        if not path.resolve().is_relative_to(Path(directory).resolve()):
            raise ArtifactError(f"the manifest in {directory} points {name!r} outside the build ({self.files[name].path})")
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing: rebuild with `apet-export build`")
        from apet_export.artifacts import check_artifact

        check_artifact(directory, path, self.files[name])  # truncated or swapped files: a clear error, not a traceback
        return path

    def model_dir(self, directory: Path) -> Path:
        """DIR/model (checkpoint + processor), checked to be there: never fall back to the network."""
        from apet_export.artifacts import check_model_dir

        return check_model_dir(directory)

    def check_files(self, directory: Path) -> None:
        """Every artifact and model/, before a command prints or loads anything."""
        for name in self.files:
            self.file(directory, name)
        self.model_dir(directory)


def load_manifest(directory: Path) -> Manifest:
    """Read DIR/manifest.json with clear errors for a non-build, a corrupt file, or another schema."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if directory.is_file():
        raise ArtifactError(f"{directory} is a file: pass the build directory (the folder that holds {MANIFEST_NAME})")
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not an apet-export build (no {MANIFEST_NAME}): create one with "
            f"`apet-export build --out {directory}`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}): rebuild with `apet-export build`") from error
    if not isinstance(data, dict):
        raise ArtifactError(
            f"{path} holds a JSON {type(data).__name__}, not the manifest object: rebuild with `apet-export build`"
        )
    try:
        manifest = Manifest.from_dict(data)
        for key in ("min", "max"):  # read by every command: fail here, not mid-run
            int(manifest.budget[key])
        if manifest.budget.get("default") is not None:  # None: the family's share of each image's tokens
            int(manifest.budget["default"])
        return manifest
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ArtifactError(f"{path} is incomplete or malformed ({error}): rebuild with `apet-export build`") from error
