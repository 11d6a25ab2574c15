"""The built wheel installs into a clean virtual environment and runs from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_only_our_packages_and_installs_cleanly(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
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
        timeout=300,
    )
    (wheel,) = dist.glob("strangler_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        names = archive.namelist()
    assert {t for t in top if not t.endswith(".dist-info")} == {"proxy", "adapters", "flags"}
    assert "proxy/demo_flags.json" in names and "proxy/py.typed" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)

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
            "import proxy, flags, adapters; print(proxy.__file__)",
        ],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
    )
    assert str(env_dir) in where.stdout, where.stderr
