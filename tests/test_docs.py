"""The documentation site: it builds with warnings as errors, and its code runs.

- ``sphinx-build -n -W --keep-going -b html docs <tmp>`` succeeds: warnings are errors,
  nitpicky (every cross-reference resolves); skipped without Sphinx, which the ``test``
  extra installs.
- Every ``.. code-block:: python`` of each page runs, the page's blocks in order as one
  script, in a subprocess in a temporary folder. A block with ``:class: requires-<what>``
  runs only where that is present (``cuda``: a GPU for CuPy; ``mpi``: mpi4py and
  ``fastnn.distributed``; ``torch``; ``onnx``: onnx and onnxruntime); the others always.
  The MNIST pages get ``FASTNN_DATA`` (``../shared/data`` when it is there) and
  ``FASTNN_DOCS_LIMIT=2000`` (a subset and one epoch, so the suite stays fast); without the
  files the pages fall back to synthetic data by themselves.
- Pages may show shell commands in ``.. code-block:: console`` blocks (not run); any other
  literal block (``::``, another language) is refused, so no unchecked code hides in them.
- The ``>>>`` examples of the public modules' docstrings pass as doctests.
"""
import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastnn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
if not DOCS.is_dir():     # a copy of tests/ without the checkout (e.g. a wheel's test run)
    pytest.skip(f"no docs/ folder beside tests/ ({DOCS})", allow_module_level=True)
PAGES = sorted(DOCS.glob("*.rst"))
DATA = ROOT.parent / "shared" / "data"
DOCTEST_MODULES = ["fastnn.network", "fastnn.layers.base", "fastnn.layers.dense",
                   "fastnn.layers.conv", "fastnn.layers.pool", "fastnn.layers.norm",
                   "fastnn.layers.augment", "fastnn.optim", "fastnn.callbacks", "fastnn.losses",
                   "fastnn.metrics", "fastnn.data", "fastnn.datasets", "fastnn.backend",
                   "fastnn.kernels"]
_BLOCK = re.compile(r"^\.\. code-block:: *(\S*)\n((?:   :[\w-]+:.*\n)*)\n((?:(?:   .*)?\n)+)",
                    re.M)


def _present(what):
    """Whether the requirement ``what`` of a marked block is met here."""
    found = importlib.util.find_spec
    if what == "cuda":
        return "cuda" in fastnn.backend.available()
    if what == "mpi":
        return found("mpi4py") is not None and found("fastnn.distributed") is not None
    if what == "torch":
        return found("torch") is not None
    if what == "onnx":
        return found("onnx") is not None and found("onnxruntime") is not None
    raise ValueError(f"unknown requirement {what!r}")


def code_blocks(page):
    """``[(language, requirements, code)]`` of a page's ``.. code-block::`` directives."""
    blocks = []
    for language, options, body in _BLOCK.findall(page.read_text()):
        classes = re.findall(r":class: *(.*)", options)
        needs = [c[len("requires-"):] for c in " ".join(classes).split()
                 if c.startswith("requires-")]
        blocks.append((language, needs, textwrap.dedent(body)))
    return blocks


def test_pages_are_found_and_have_code():
    names = {p.stem for p in PAGES}
    assert {"index", "getting_started", "tutorial", "gpu", "saving", "distributed", "interop",
            "habits", "api"} <= names
    for page in PAGES:
        if page.stem not in ("index", "api"):
            assert any(lang == "python" for lang, _, _ in code_blocks(page)), page.name


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_no_unchecked_literal_blocks(page):
    text = page.read_text()
    assert len(code_blocks(page)) == text.count(".. code-block::"), \
        f"{page.name}: a code-block this test cannot parse (3-space indent, options, blank line)"
    for language, _, _ in code_blocks(page):
        assert language in ("python", "console"), \
            f"{page.name}: a code-block in {language!r} (only python, which is run, or console)"
    bare = [line for line in text.splitlines()
            if line.rstrip().endswith("::") and not line.lstrip().startswith("..")]
    assert not bare, f"{page.name}: literal blocks ('::') are not run; use a code-block: {bare}"


def _run_page(page, folder, data):
    """Run the page's python blocks (those whose requirements are met) as one script in
    ``folder``, with ``FASTNN_DATA=data``; fail with its output if it fails."""
    parts, skipped = [], []
    for i, (language, needs, code) in enumerate(code_blocks(page)):
        if language != "python":
            continue
        missing = [n for n in needs if not _present(n)]
        if missing:
            skipped.append((i, missing))
            continue
        parts.append(f"# ---- {page.name}, code block {i} ----\n{code}")
    env = dict(os.environ, FASTNN_DOCS_LIMIT="2000", MPLBACKEND="Agg", FASTNN_DATA=str(data),
               HOME=str(folder))             # no ~/.cache/fastnn copy of MNIST either
    script = folder / f"{page.stem}.py"
    script.write_text("\n".join(parts))
    result = subprocess.run([sys.executable, str(script)], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{page.name}'s code failed (blocks skipped: {skipped}):\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-5000:]}")
    return result.stdout


@pytest.mark.parametrize("page", [p for p in PAGES if any(
    lang == "python" for lang, _, _ in code_blocks(p))], ids=lambda p: p.stem)
def test_page_code_runs(page, tmp_path):
    _run_page(page, tmp_path, DATA if DATA.is_dir() else tmp_path / "no-data")


def test_tutorial_runs_without_the_data(tmp_path):
    out = _run_page(DOCS / "tutorial.rst", tmp_path, tmp_path / "no-data")
    assert "MNIST not found, synthetic data instead" in out


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed (see above)"


def test_sphinx_build_has_no_warning(tmp_path):
    pytest.importorskip("sphinx")
    result = subprocess.run([sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b",
                             "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
                             str(tmp_path / "html")],
                            capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)     # autodoc imports the installed fastnn, not ./fastnn
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "html" / "api.html").is_file()
