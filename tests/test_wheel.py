"""The built wheel installs into a clean virtual environment and runs from anywhere."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from proxy import build

ROOT = Path(__file__).resolve().parent.parent


COMPILED = re.findall(r'^    "(\w+/\w+)\.py",$', (ROOT / "setup.py").read_text(), re.MULTILINE)


def build_wheel(dist: Path, **env: str) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        env={**os.environ, **env},
    )
    (wheel,) = dist.glob("strangler_proxy-*.whl")
    return wheel


def test_the_per_request_modules_under_test_are_the_compiled_ones() -> None:
    assert len(COMPILED) > 20
    for name in COMPILED:
        module = importlib.import_module(name.replace("/", "."))
        assert module.__file__ is not None and module.__file__.endswith(".so"), name
    assert build() == "compiled"


@pytest.mark.slow
def test_without_a_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist", STRANGLER_NO_EXTENSIONS="1")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert not any(n.endswith(".so") for n in names)
    assert "proxy/server.py" in names


@pytest.mark.slow
def test_the_wheel_holds_only_our_packages_and_installs_cleanly(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        names = archive.namelist()
    assert {t for t in top if not t.endswith(".dist-info")} == {"proxy", "adapters", "flags"}
    assert "proxy/demo_flags.json" in names and "proxy/py.typed" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # The compiled modules, their sources beside them for reference.
    for name in COMPILED:
        assert any(n.startswith(name + ".cpython-") and n.endswith(".so") for n in names), name
    assert any(n.startswith("proxy/_native__mypyc.") for n in names)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    pip = env_dir / "bin" / "pip"
    subprocess.run(
        [str(pip), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(env_dir / "bin" / "strangler"), "--help"],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
    )
    assert result.returncode == 0, result.stderr
    for command in ("run", "check", "demo"):
        assert command in result.stdout
    where = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "import proxy, flags, adapters; print(proxy.__file__, proxy.build())",
        ],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
    )
    assert str(env_dir) in where.stdout, where.stderr
    assert where.stdout.split()[-1] == "compiled"
