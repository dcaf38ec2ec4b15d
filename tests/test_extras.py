"""Features behind extras (pyproject.toml): without the library, a MissingDependencyError naming the extra."""

import sys
from pathlib import Path

import pytest

from apet_export.errors import MissingDependencyError


def test_video_without_pyav_names_the_video_extra(monkeypatch, tmp_path):
    from apet_export.runtime.video import count_frames

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"apet-export\[video\]"):
        count_frames(tmp_path / "clip.mp4")


def test_visualize_without_matplotlib_names_the_viz_extra(monkeypatch, tmp_path):
    from apet_export.visualize import visualize_build

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"apet-export\[viz\]"):
        visualize_build(Path(tmp_path), None, None, tmp_path / "apet.png")


def test_plugin_graph_without_extensions_names_the_extra(monkeypatch, tmp_path):
    from apet_export.plugins import apet_score
    from apet_export.runtime.sessions import onnxruntime_session

    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    # the registration is cached once per process (a second one conflicts in onnxruntime-extensions): an earlier
    # test may have made it, so this test calls the uncached function; the cached one is back afterwards
    monkeypatch.setattr(apet_score, "register_onnxruntime_reference", apet_score.register_onnxruntime_reference.__wrapped__)
    with pytest.raises(MissingDependencyError, match=r"apet-export\[plugin-reference\]"):
        onnxruntime_session(tmp_path / "vision.plugin.onnx", apet_score=True)


def test_pyproject_keeps_the_optional_libraries_in_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for library in ("matplotlib", "av>", "onnxruntime-extensions", "onnxruntime-genai"):
        assert library not in core
    extras = project["optional-dependencies"]
    assert extras["bench"] == ["onnxruntime-genai==0.18.0"]
    assert "apet-export[video,viz,plugin-reference,serve]" in extras["dev"]  # the tests need all four
