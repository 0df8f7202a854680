"""Packaging: environment.yml names the same packages as pyproject.toml; the CI runs the README's test command."""

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip_extra = {_name(r) for r in pip_section if not r.startswith("-e")}
    expected = {CONDA_NAMES.get(n, n) for n in pip_names}
    assert conda | pip_extra == expected


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, re.M)
    assert readme.index("make book") < readme.index("make test")


def test_package_docstring_maps_every_module():
    """The package docstring, a newcomer's map of the house, names every module of wmloc_utils and no other."""
    import pkgutil

    import wmloc_utils

    modules = {m.name for m in pkgutil.iter_modules(wmloc_utils.__path__)}
    assert set(re.findall(r":mod:`wmloc_utils\.(\w+)`", wmloc_utils.__doc__)) == modules
