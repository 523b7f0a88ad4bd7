"""The short public API: every documented name imports from the package root, lazily."""

import subprocess
import sys

import pytest

import orsgen


@pytest.mark.parametrize("name", sorted(orsgen._PUBLIC))
def test_public_name_resolves_to_its_module(name):
    value = getattr(orsgen, name)
    assert getattr(value, "__name__", name) == name or name.isupper()
    assert value is getattr(__import__(orsgen._PUBLIC[name], fromlist=[name]), name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        orsgen.nope  # noqa: B018


def test_import_orsgen_loads_neither_beam_nor_torch():
    code = "import sys, orsgen; print(any(m.split('.')[0] in ('apache_beam', 'torch', 'transformers') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_build_graph_imports_no_torch_or_transformers():
    code = "import sys, orsgen.pipelines.build; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists packages by hand (the root is the package): a new sub-package must be listed."""
    import tomllib
    from pathlib import Path

    root = Path(orsgen.__file__).parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"orsgen"}
    for init in root.rglob("__init__.py"):
        rel = init.parent.relative_to(root)
        if rel.parts and rel.parts[0] in ("tests", "benchmarks", "docs", "build", "containers") or any(
            p.startswith(".") for p in rel.parts
        ):
            continue
        if rel.parts:
            found.add("orsgen." + ".".join(rel.parts))
    assert found == listed, f"add to / remove from pyproject [tool.setuptools] packages: {sorted(found ^ listed)}"
