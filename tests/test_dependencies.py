"""
The dependency floors setup.cfg declares, kept equal to the README's
Dependencies table (which says why each is what it is) and to the
Makefile's install line, and met by the environment the suite runs in.

Why: each floor was checked by running the suite against exactly that
version (tests/depfloors.py); one lowered or raised in one place only
would make the others untrue, and a packager reads setup.cfg while a
developer's .venv gets the Makefile's.  These checks read files only;
the slow check of the floors themselves is tests/depfloors.py.
"""

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.version import Version

from depfloors import normalised, requirements

REPO = Path(__file__).resolve().parent.parent
HEADING = "### Dependencies\n"


def readmeTable():
    """
    The Dependencies table of README.md: {normalised name: (name with
    extras, floor)}, the Python row under C{"python"}.
    """
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(HEADING) == 1, "no one Dependencies section in README.md"
    rows = {}
    for line in readme.split(HEADING, 1)[1].split("\n#", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        named = re.match(r"`([^`]+)`", cells[0])
        if len(cells) < 3 or named is None:
            continue
        name, floor = named.group(1), cells[1]
        rows[normalised(re.sub(r"\[.*\]", "", name))] = (name, floor)
    return rows


def test_theReadmeTableIsSetupCfgsFloors():
    """
    Every requirement of setup.cfg (install_requires and the extras) is a
    row of the README's table with the same extras and floor, and the
    table has no other row but Python's, whose floor is python_requires.
    """
    table = readmeTable()
    declared = {normalised(name): (name + extras, floor) for name, extras, floor in requirements()}
    python = table.pop("python")
    assert table == declared
    setupCfg = (REPO / "setup.cfg").read_text(encoding="utf-8")
    assert f"python_requires = >={python[1]}\n" in setupCfg


def test_theMakefileInstallsTheSameFloors():
    """
    The Makefile's .venv gets every requirement with setup.cfg's floor:
    a floor raised in setup.cfg alone would leave .venv on a version
    it no longer allows (pip keeps an installed version that satisfies
    the line it is given).
    """
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    installed = set(re.findall(r"'([^' ]+)'", makefile))
    for name, extras, floor in requirements():
        assert f"{name}{extras}>={floor}" in installed, f"the Makefile does not install {name}{extras}>={floor}"


def test_thisEnvironmentMeetsTheFloors():
    """
    The interpreter running the suite has every declared requirement at
    its floor or newer, and is at least python_requires: a .venv made
    before a floor was raised fails here, saying which, rather than in a
    test that needs the newer API.
    """
    table = readmeTable()
    assert sys.version_info >= tuple(int(part) for part in table["python"][1].split("."))
    for name, _, floor in requirements():
        version = importlib.metadata.version(name)
        assert Version(version) >= Version(floor), f"{name} {version} is older than its floor {floor} (make install updates .venv)"
