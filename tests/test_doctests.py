"""The docstring examples of the package and the README's Python snippets, run as tests.

Every ``>>>`` example in the package's modules runs as one parametrised case (one per
docstring), so a docstring that no longer matches the code fails here. The README's
```` ```python ```` blocks must compile, and those preceded by :data:`README_MARK` run in a
fresh namespace.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import l2l_optim

#: module prefixes whose docstrings are not collected: the kernels are tested against the
#: reference in test_kernels.py, and their build is not something a reader runs by hand
EXCLUDED = ("l2l_optim.kernels",)
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

README = Path(__file__).resolve().parents[1] / "README.md"
#: an HTML comment (invisible on GitHub) on the line before a ```python block that must run
README_MARK = "<!-- tested: tests/test_doctests.py -->"


def module_names() -> list[str]:
    names = ["l2l_optim"]
    for info in pkgutil.walk_packages(l2l_optim.__path__, "l2l_optim."):
        if info.name.startswith(EXCLUDED) or info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        names.append(info.name)
    return sorted(names)


def collect() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in module_names():
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module, name) if t.examples]
    return sorted(tests, key=lambda t: t.name)


def runnable(test: doctest.DocTest) -> int:
    return sum(not ex.options.get(doctest.SKIP, False) for ex in test.examples)


DOCTESTS = collect()


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples(test, tmp_path, monkeypatch):
    # a fresh copy of the globals for every run; an example that writes a relative path
    # writes it in a temporary directory
    monkeypatch.chdir(tmp_path)
    fresh = doctest.DocTest(test.examples, dict(test.globs), test.name, test.filename,
                            test.lineno, test.docstring)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    result = runner.run(fresh, out=report.append)
    assert result.failed == 0, "".join(report)


def _public_objects():
    from l2l_optim import cli

    for name in l2l_optim.__all__:
        if name != "__version__":
            yield name, getattr(l2l_optim, name)
    yield "cli.main", cli.main


@pytest.mark.parametrize("name,obj", list(_public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_api_has_sections_and_a_runnable_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    try:
        params = inspect.signature(obj).parameters
    except ValueError:  # a class whose constructor is builtin (a warning category)
        params = {}
    if params:
        assert "Args:" in doc, f"{name}: no Args: section"
    assert "Example:" in doc, f"{name}: no Example: section"
    if inspect.isfunction(obj):
        assert "Returns:" in doc, f"{name}: no Returns: section"
    module = inspect.getmodule(obj)
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs=dict(vars(module)))
    assert any(runnable(t) for t in tests), f"{name}: no runnable >>> example"
    # the example runs: in the collection above, or here where its module is left out of it
    if f"{module.__name__}.{obj.__qualname__}" not in {t.name for t in DOCTESTS}:
        for test in tests:
            report: list[str] = []
            result = doctest.DocTestRunner(optionflags=OPTIONFLAGS).run(test, out=report.append)
            assert result.failed == 0, "".join(report)


# ------------------------------------------------------------------------------ README


def readme_blocks() -> list[tuple[int, str, bool]]:
    """``(line, code, marked)`` for every ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((line, m.group(1), before.strip() == README_MARK))
    return blocks


def test_readme_python_blocks_compile():
    blocks = readme_blocks()
    assert blocks, "README.md has no ```python blocks"
    for line, code, _ in blocks:
        compile(code, f"README.md:{line}", "exec")


def test_readme_marked_blocks_run():
    marked = [(line, code) for line, code, is_marked in readme_blocks() if is_marked]
    assert marked, f"no ```python block in README.md follows {README_MARK}"
    namespaces = []
    for line, code in marked:
        namespace = {"__name__": "__readme__"}
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
        namespaces.append(namespace)
    # the first is the quickstart: its toy two-class model ends below chance level on its data
    model, x, y = (namespaces[0][k] for k in ("model", "x", "y"))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert math.isfinite(loss) and loss < math.log(2), loss


def test_public_functions_stay_functions_after_every_submodule_import():
    """No public name is also a submodule: importing the submodule would rebind it."""
    for info in pkgutil.walk_packages(l2l_optim.__path__, "l2l_optim."):
        if not info.name.startswith("l2l_optim.repro"):
            importlib.import_module(info.name)
    for name in l2l_optim._EXPORTS:
        assert not inspect.ismodule(getattr(l2l_optim, name)), name
