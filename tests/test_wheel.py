"""Installed as users install it: build the wheel, install it into a fresh venv, use it there.

The fresh venv gets only the wheel (no dependencies); torch, transformers and the rest come
from the project's own environment through a .pth line, so the test takes seconds and never
downloads. The .pth adds that site-packages as a plain path (its own .pth files, including the
editable install's, are not processed), and the fresh venv's own site-packages comes first, so
`moe_prefetch` is imported from the wheel, never from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from moe_prefetch.runtime import profiles as hw

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    # Build from a clean copy: a stale build/ folder in the checkout would put files the tree no
    # longer has into the wheel (setuptools reuses it), hiding a packaging mistake.
    source = tmp / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "runs", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        check=True,
        cwd=tmp,
    )
    (wheel,) = dist.glob("moe_prefetch-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    bindir = env_dir / "bin"
    site = Path(
        subprocess.check_output(
            [str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        cwd=tmp,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", NO_COLOR="1", COLUMNS="200", HOME=str(tmp))
    return {"bin": bindir, "site": site, "env": env, "cwd": tmp}


def _run(installed, *args):
    return subprocess.run(
        list(args), cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=300
    )


def test_wheel_imports_the_installed_package_not_the_checkout(installed):
    out = _run(installed, str(installed["bin"] / "python"), "-c", "import moe_prefetch; print(moe_prefetch.__file__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(installed["site"])), out.stdout


def test_wheel_ships_every_package(installed):
    """Every module of the checkout, in every package, is in the wheel and imports there (a
    package missing from pyproject's `packages` would be left out of the wheel)."""
    names = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "moe_prefetch").rglob("*.py")
        if p.name != "__main__.py"
    )
    assert len(names) > 40, names
    code = f"import importlib; [importlib.import_module(n) for n in {names!r}]; print('ok')"
    out = _run(installed, str(installed["bin"] / "python"), "-c", code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_wheel_builds_the_host_lanes_c_kernels(installed):
    """The installed package carries cpu_kernels.c and builds it at first use into the user's cache
    (HOME is the test's folder), never into the package; without a compiler torch's kernels run."""
    from moe_prefetch.experts import cpu_kernels

    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler here: torch's kernels run (tested in test_cpu_kernels.py)")
    code = "from moe_prefetch.experts import cpu_kernels as c; s = c.status(); print(s.reason); print(s.path)"
    env = {k: v for k, v in installed["env"].items() if k not in ("MOE_PREFETCH_CACHE", "XDG_CACHE_HOME")}
    out = subprocess.run(
        [str(installed["bin"] / "python"), "-c", code], cwd=installed["cwd"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "self-check passed" in out.stdout, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith(str(installed["cwd"] / ".cache")), out.stdout
    assert not list(installed["site"].rglob("*.so")), "a kernel was built into the installed package"


def test_wheel_lists_every_shipped_profile(installed):
    out = _run(installed, str(installed["bin"] / "moe-prefetch"), "profiles")
    assert out.returncode == 0, out.stderr
    shipped = sorted(p.stem for p in hw.SHIPPED_DIR.glob("*.toml"))
    assert len(shipped) >= 6
    for name in shipped:
        assert name in out.stdout, f"profile {name} missing from the installed wheel:\n{out.stdout}"
    hosts = sorted(p.stem for p in (hw.SHIPPED_DIR / "host").glob("*.toml"))
    assert len(hosts) >= 4
    for name in hosts:
        assert name in out.stdout.split("host profiles", 1)[-1], f"host profile {name} missing from the wheel"


def test_wheel_runs_the_demo_with_a_profile_and_writes_the_report(installed):
    report = installed["cwd"] / "report"
    out = _run(
        installed,
        str(installed["bin"] / "moe-prefetch"),
        "run",
        "--prompt",
        "import os",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--profile",
        "rtx3060-12gb",
        "--report",
        str(report),
    )
    assert out.returncode == 0, out.stderr
    assert (report / "run.json").stat().st_size > 0
    assert (report / "report.html").stat().st_size > 0


def test_python_dash_m_runs_the_cli(installed):
    out = _run(installed, str(installed["bin"] / "python"), "-m", "moe_prefetch", "--help")
    assert out.returncode == 0, out.stderr
    assert "moe-prefetch" in out.stdout and "run" in out.stdout


def test_wheel_installs_no_top_level_module_but_its_own(installed):
    python = str(installed["bin"] / "python")
    out = _run(installed, sys.executable, "-m", "pip", "--python", python, "show", "-f", "moe-prefetch")
    assert out.returncode == 0, out.stderr
    files = out.stdout.split("Files:", 1)[1].split()
    top = {f.split("/", 1)[0] for f in files if not f.startswith("..")}
    assert top <= {"moe_prefetch", next(t for t in top if t.endswith(".dist-info"))}, top
