"""A non-editable wheel ships grammar/ as surgeon.grammar (with peft.lark) and passes/ as
surgeon.passes, and the language works from it alone (no repository on the path)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_works_without_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("surgeon-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"surgeon/grammar/peft.lark", "surgeon/passes/merge.py", "surgeon/lang/parser.py"} <= names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import surgeon, surgeon.passes; assert surgeon.__file__.startswith(%r);"
            "print(surgeon.print_spec(surgeon.load_spec('adapter a = lora(r=4) { target q_proj }')))"
            % str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "target q_proj" in out.stdout


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists packages by hand: a new folder (a method, a stage) must be added there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "surgeon").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
