"""Every KVGRID_* variable is declared once, in kvgrid/envs.py, and read through it; the
README's table is that module's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from kvgrid import envs
from kvgrid.store.config import default_store_dir

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bKVGRID_[A-Z0-9_]+\b")


def named_outside_envs(path: Path) -> list[str]:
    """KVGRID_* names a module spells as a whole string or keyword (how a read or write of
    the variable is written); names inside longer text (help, docstrings) do not count."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if NAME.fullmatch(node.value):
                hits.append(node.value)
        elif isinstance(node, ast.keyword) and node.arg and NAME.fullmatch(node.arg):
            hits.append(node.arg)
    return hits


def test_every_name_in_the_package_is_declared():
    seen = {m for p in (ROOT / "kvgrid").rglob("*.py") for m in NAME.findall(p.read_text())}
    assert seen - set(envs.ALL) == set()
    # and nothing is declared that no code reads
    assert set(envs.ALL) - seen == set()


def test_variables_are_read_through_the_module_only():
    offenders = {
        str(p.relative_to(ROOT)): named_outside_envs(p)
        for p in (ROOT / "kvgrid").rglob("*.py")
        if p.name != "envs.py"
    }
    assert {f: n for f, n in offenders.items() if n} == {}


def test_the_check_sees_a_direct_read(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('import os\nA = os.environ.get("KVGRID_LOG")\nB = dict(KVGRID_PDL="0")\n')
    assert named_outside_envs(f) == ["KVGRID_LOG", "KVGRID_PDL"]


def test_readme_table_is_the_declarations():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- envs:begin -->\n", 1)[1].split("<!-- envs:end -->", 1)[0]
    assert block == envs.markdown_table()


def test_values_are_read_when_asked_typed_and_empty_is_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("KVGRID_STORE_DIR", str(tmp_path / "s"))
    assert default_store_dir() == tmp_path / "s"
    monkeypatch.setenv("KVGRID_STORE_DIR", "")
    assert envs.KVGRID_STORE_DIR.get() is None and not envs.KVGRID_STORE_DIR.is_set()
    monkeypatch.setenv("KVGRID_PDL", "0")
    assert envs.KVGRID_PDL.get() is False
    monkeypatch.setenv("KVGRID_PDL", "1")
    assert envs.KVGRID_PDL.get() is True
    monkeypatch.delenv("KVGRID_LOG", raising=False)
    assert envs.KVGRID_LOG.get() == "INFO"
    monkeypatch.setenv("KVGRID_HOME", "~/kvh")
    assert envs.KVGRID_HOME.get() == Path.home() / "kvh"
