import doctest
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import curvkit

ROOT = Path(__file__).resolve().parents[1]
PLOTTING = ("matplotlib", "seaborn")
# every public module but the one allowed to plot
LIGHT_MODULES = sorted(
    {m for m in curvkit._EXPORTS.values()}
    | {m for s, m in curvkit._SUBMODULES.items() if s != "plotting"}
    | {"curvkit.app.cli"}
)


def exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def loaded_plotting_modules(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the plotting modules it left in ``sys.modules``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return sorted(set(out.strip().splitlines()[-1].split()) & set(PLOTTING))


def test_import_curvkit_loads_no_plotting_library():
    assert loaded_plotting_modules("import curvkit") == []


def test_public_modules_load_no_plotting_library():
    present = [m for m in LIGHT_MODULES if exists(m)]
    assert "curvkit.app.cli" in present and "curvkit.problems" in present
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in present)
    assert loaded_plotting_modules(code) == []


def test_all_is_the_export_table():
    assert sorted(curvkit.__all__) == sorted([*curvkit._EXPORTS, *curvkit._SUBMODULES])
    assert len(set(curvkit.__all__)) == len(curvkit.__all__)
    assert dir(curvkit) == sorted(curvkit.__all__)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        curvkit.not_a_name  # noqa: B018


@pytest.mark.parametrize("name", curvkit.__all__, ids=curvkit.__all__)
def test_public_name_resolves(name):
    module = curvkit._EXPORTS.get(name) or curvkit._SUBMODULES[name]
    if not exists(module):
        pytest.skip(f"{module} is not in the package yet")
    value = getattr(curvkit, name)
    if name in curvkit._EXPORTS:
        assert value is getattr(importlib.import_module(module), name)
    else:
        assert value is importlib.import_module(module)


def test_api_doc_lists_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\| `(?:ck\.)?(\w+)", text, flags=re.M))
    assert set(curvkit.__all__) <= documented, set(curvkit.__all__) - documented


def test_version_matches_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"', pyproject, flags=re.M).group(1) == curvkit.__version__


DOCTESTED = ["curvkit", "curvkit.problems"]


@pytest.mark.parametrize("module", DOCTESTED, ids=DOCTESTED)
def test_docstring_examples_run(module):
    if module == "curvkit" and not exists("curvkit.extraction"):
        pytest.skip("the package docstring example needs curvkit.extraction")
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


DOCS = [
    "README.md",
    "docs/guide.md",
    "docs/optimizer.md",
    "docs/operators.md",
    "docs/distributed.md",
]


@pytest.mark.parametrize("path", DOCS, ids=DOCS)
def test_documented_python_examples_run(path):
    # every ```python block of the page, in order, in one namespace
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), flags=re.S)
    assert blocks, f"{path} has no Python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(ROOT / path), "exec"), namespace)
