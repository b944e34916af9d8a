"""Sphinx configuration of fastnn's documentation.

Build: ``sphinx-build -n -W --keep-going -b html docs docs/_build/html`` (tests/test_docs.py
does it: warnings as errors, nitpicky). The API reference is autodoc of the installed package;
docstrings are NumPy style (napoleon; ``napoleon_use_param = False`` keeps the free-text types
such as "int or (int, int), default 1" as text, not as cross-references). The code blocks of
the pages are run by tests/test_docs.py.
"""
import fastnn

project = "fastnn"
author = "the fastnn developers"
copyright = "2026, the fastnn developers"
release = version = fastnn.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_param = False
napoleon_custom_sections = [("Shapes", "notes_style")]
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True
html_theme = "alabaster"
html_static_path = []
