"""The lock file (requirements-lock.txt) and pyproject.toml's ranges agree, so a change to one
without the other fails `make test`; and the checks that say so can fail."""

import importlib.util
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock_tool", ROOT / "tools" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def test_every_direct_dependency_is_locked_within_its_range():
    pins = lock.read_lock()
    requirements = lock.direct_requirements()
    assert lock.disagreements(pins, requirements) == []
    # The README's commands install these; a lock that lost one would install an unpinned version.
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "lm-eval", "flwr", "bitsandbytes",
                 "deepspeed", "opacus", "cryptography"):
        assert name in pins, name
    # Torch is the local CPU wheel (the Makefile installs it first); no CUDA package may be locked.
    assert str(pins["torch"]).endswith("+cpu")
    assert not [name for name in pins if name.startswith("nvidia-")]
    # The build back-end is locked too: the project is installed without build isolation.
    assert {"setuptools", "wheel"} <= set(pins)


def _project(tmp_path, dependencies, extras=None):
    extras = extras or {"test": [], "flower": []}
    lines = ["[project]", 'name = "x"', f"dependencies = {dependencies!r}".replace("'", '"'),
             "[project.optional-dependencies]"]
    lines += [f"{extra} = {values!r}".replace("'", '"') for extra, values in extras.items()]
    path = tmp_path / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return lock.direct_requirements(path)


def test_a_range_that_excludes_the_locked_version_or_an_unlocked_dependency_is_named(tmp_path):
    pins = {"transformers": Version("5.25.0"), "peft": Version("0.21.2")}
    assert lock.disagreements(pins, _project(tmp_path, ["transformers>=5,<6", "peft>=0.18"])) == []
    problems = lock.disagreements(pins, _project(tmp_path, ["transformers>=5,<5.25", "peft>=0.18"],
                                                 {"test": ["pytest>=8"], "flower": []}))
    assert len(problems) == 2
    assert "transformers" in problems[0] and "5.25.0" in problems[0] and "<5.25" in problems[0]
    assert problems[1].startswith("pytest: in pyproject.toml")


def test_the_lock_reader_takes_pip_compile_output_and_refuses_a_loose_line(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text("#\n# header\n#\nTorch==2.13.0+cpu\n    # via florist-hf\nlm_eval==0.4.13\n")
    assert lock.read_lock(path) == {"torch": Version("2.13.0+cpu"), "lm-eval": Version("0.4.13")}
    path.write_text("transformers>=5\n")
    with pytest.raises(ValueError, match="lock.txt:1: 'transformers>=5' is not an exact pin"):
        lock.read_lock(path)


def test_drift_names_each_package_that_differs_from_the_lock():
    pins = {"transformers": Version("5.24.0"), "kernels": Version("0.19.1"), "peft": Version("0.21.2"),
            "setuptools": Version("84.2.1"), "wheel": Version("0.48.0"), "opacus": Version("1.6.0")}
    environment = {"transformers": Version("5.25.0"), "peft": Version("0.21.2"), "kernels": Version("0.19.1"),
                   "newdep": Version("1.0"), "pip": Version("26.3"), "florist-hf": Version("0.1.0"),
                   "setuptools": Version("85.0")}
    # pip beside the lock and wheel only in a build's environment are no drift; setuptools at another
    # version is.
    assert lock.drift(pins, environment) == ["newdep: 1.0 (not in the lock)", "opacus: not installed (lock 1.6.0)",
                                             "setuptools: 85.0 (lock 84.2.1)", "transformers: 5.25.0 (lock 5.24.0)"]
