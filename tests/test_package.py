import contextlib
import doctest
import importlib
import importlib.util
import io
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
    # every ```python block of the page, in order, in one namespace; where the page shows
    # the block's output ("Output:" and a ```text block right after it), the printed
    # output must match it: the same words, numbers within 2% (or 0.02)
    text = (ROOT / path).read_text()
    blocks = re.findall(r"```python\n(.*?)```(\s*Output:\s*```text\n(.*?)```)?", text, flags=re.S)
    assert blocks, f"{path} has no Python example"
    namespace: dict = {}
    for block, _, shown in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(ROOT / path), "exec"), namespace)
        if shown:
            _assert_same_output(out.getvalue(), shown, path)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _assert_same_output(printed: str, shown: str, path: str) -> None:
    got, want = printed.strip().splitlines(), shown.strip().splitlines()
    assert len(got) == len(want), f"{path}: printed\n{printed}\nbut the page shows\n{shown}"
    for g, w in zip(got, want):
        assert _NUMBER.sub("#", g).split() == _NUMBER.sub("#", w).split(), (
            f"{path}: printed {g!r}, the page shows {w!r}"
        )
        for a, b in zip(_NUMBER.findall(g), _NUMBER.findall(w)):
            exact = not any(c in a + b for c in ".e")  # integers: shapes, counts
            tol = 0.0 if exact else 0.02 * max(1.0, abs(float(b)))
            assert abs(float(a) - float(b)) <= tol, f"{path}: printed {g!r}, the page shows {w!r}"
