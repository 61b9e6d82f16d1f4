"""The commands a new user runs first (`--help`, `profiles`) do not load torch. (Import cycles
and the packages' layers: test_layers.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_prefetch"


@pytest.mark.parametrize(
    "args", [["--help"], ["profiles"], ["run", "--help"], ["bench", "--help"], ["report", "--help"]]
)
def test_help_and_profiles_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from moe_prefetch.cli.main import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
