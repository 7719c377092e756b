"""``pip install .`` at the root installs the three distributions of this checkout."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_the_root_distribution_depends_on_the_three_from_distributions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set()
    for line in project["dependencies"]:
        # hatchling expands {root:uri} to this checkout's file: URL when it builds.
        requirement = Requirement(line.replace("{root:uri}", ROOT.as_uri()))
        assert requirement.url is not None, f"{line}: not taken from this checkout"
        folder = Path(requirement.url.removeprefix("file://"))
        assert folder.parent == ROOT / "distributions", line
        name = tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"]
        assert name == requirement.name, f"{line}: {folder} declares {name}"
        declared.add(name)
    on_disk = {path.name for path in (ROOT / "distributions").iterdir() if path.is_dir()}
    assert declared == on_disk
    # No package of its own: the wheel holds only the dependencies.
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"] == {"bypass-selection": True}
