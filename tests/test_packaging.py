"""What a user gets from PyPI: the license, the typing marker, a README whose links work there."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _metadata() -> configparser.SectionProxy:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]


def test_readme_links_are_absolute_and_point_at_files_of_the_repository() -> None:
    """The README is the PyPI long description, where relative links lead nowhere."""
    url = _metadata()["url"].rstrip("/")
    links = MARKDOWN_LINK.findall((ROOT / "README.md").read_text())
    assert len(links) >= 10
    for link in links:
        assert link.startswith(f"{url}/blob/main/") or link.startswith(f"{url}/tree/main/"), link
        path = link.split("/main/", 1)[1]
        assert (ROOT / path).exists(), f"{link}: no {path} in the repository"


def test_license_file_is_the_declared_mit_license() -> None:
    metadata = _metadata()
    assert metadata["license"] == "MIT" and metadata["license_files"].strip() == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the secorder_hooks developers" in text


def test_typing_marker_is_package_data() -> None:
    assert (ROOT / "secorder_hooks" / "py.typed").exists()
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.package_data"]["secorder_hooks"].split() == ["py.typed"]


def test_numpy_is_a_dependency() -> None:
    """Without numpy, torch warns "Failed to initialize NumPy" on every run."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert any(line.startswith("numpy") for line in config["options"]["install_requires"].split())


@pytest.mark.slow
def test_wheel_holds_license_typing_marker_and_absolute_readme(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        timeout=600,
    )
    [wheel] = tmp_path.glob("secorder_hooks-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert "secorder_hooks/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert "Requires-Dist: numpy" in text
    description = text.split("\n\n", 1)[1]
    assert all(link.startswith("https://") for link in MARKDOWN_LINK.findall(description))
