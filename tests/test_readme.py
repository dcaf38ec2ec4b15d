"""README facts a newcomer relies on (issue 8)."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_no_links_outside_the_repository():
    assert "../" not in README  # e.g. ../shared is not part of a clone
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert target.startswith("https://") or (Path(__file__).resolve().parents[1] / target).exists(), target


def test_cpu_torch_from_the_cpu_index_and_the_plain_form():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert 'pip install torch==2.13.0 && pip install -e ".[export]"' in README  # building needs the export extra


def test_lean_install_runs_a_build_without_the_export_extra():
    assert "pip install -e . -c constraints.txt && apet-export run" in README


def test_python_example_ends_the_answer_line_before_the_summary():
    example = README[README.index("for delta in generation:"):]
    assert re.search(r"print\(delta, end=\"\", flush=True\)\n\s+print\(\)\s+#.*\n\s+print\(generation\.result\.summary\(\)\)", example)
