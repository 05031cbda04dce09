"""The README's "Testing your sagas" block, as a user copies it: written with the 30-second example's
``myapp`` (both read from README.md itself) into an empty folder, and run there with pytest, with no broker
or database configured."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def _section(readme: str, heading: str) -> str:
    start = readme.index(heading) + len(heading)
    end = readme.find("\n## ", start)
    return readme[start:] if end < 0 else readme[start:end]


def _named_python_blocks(section: str) -> dict[str, str]:
    files = {}
    for block in re.findall(r"^```python\n(.*?)^```", section, re.M | re.S):
        named = re.match(r"#\s*([\w./-]+\.py)\b", block)
        if named:
            files[named.group(1)] = block
    return files


def test_the_readme_testing_example_passes_in_an_empty_project(tmp_path):
    readme = (ROOT / "README.md").read_text()
    files = {**_named_python_blocks(_section(readme, "## A 30-second example")),
             **_named_python_blocks(_section(readme, "## Testing your sagas"))}
    assert set(files) == {"myapp/services.py", "myapp/sagas.py", "tests/test_booking.py"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_booking.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout
