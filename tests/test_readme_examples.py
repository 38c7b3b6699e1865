"""The README's Python examples run as written: every ```python block marked `# tested`,
in order, in one namespace, in a temporary working directory."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n# tested\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own code
    assert (tmp_path / "out" / "example" / "quantization.json").is_file()
    assert '"method": "loraq"' in capsys.readouterr().out
