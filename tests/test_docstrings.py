"""Every public class and function documents itself: a docstring that names each of its
parameters (constructor arguments for a class), and, for a layer, its input/output shapes.

"Public" is each public module's ``__all__`` (the names API.md promises) and the public
methods those classes define, so ``help(fn.BatchNorm2d)`` or ``help(net.fit)`` always says
what every argument means. A method is checked where its protocol is first defined (e.g.
``Layer.forward``, ``Callback.on_epoch_end``, ``Schedule.lr_at``): the overrides in
subclasses implement that documented contract and are not made to repeat it.
"""
import importlib
import inspect
import re

import pytest

import fastnn
from fastnn.callbacks import Callback

PUBLIC_MODULES = ["fastnn", "fastnn.layers", "fastnn.optim", "fastnn.callbacks", "fastnn.losses",
                  "fastnn.metrics", "fastnn.data", "fastnn.datasets", "fastnn.backend",
                  "fastnn.kernels", "fastnn.activations"]
_SKIPPED_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _public_objects():
    """(qualified name, object) for every public class, function and method, each once."""
    seen, found = set(), []

    def add(name, obj):
        if id(obj) not in seen:
            seen.add(id(obj))
            found.append((name, obj))

    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                add(f"{modname}.{name}", obj)
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member) \
                            and not _overrides(obj, attr):
                        add(f"{obj.__module__}.{obj.__qualname__}.{attr}", member)
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                add(f"{modname}.{name}", obj)
    return found


def _overrides(cls, attr):
    """Whether ``cls.attr`` overrides a method of a fastnn base class (its documented home),
    or is one of the callback hooks (documented once, on ``fastnn.callbacks.Callback``)."""
    if cls is not Callback and attr in vars(Callback):
        return True
    return any(attr in vars(base) for base in cls.__mro__[1:]
               if base.__module__.startswith("fastnn"))


def _parameters(obj):
    """The names a docstring must mention: a function's parameters, a class's constructor's."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):         # a builtin without a signature
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind not in _SKIPPED_KINDS and p.name not in ("self", "cls")]


def _doc(obj):
    """The text help() shows first: the class docstring (with __init__'s, if any) or the
    function's."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__init__" in vars(obj) and vars(obj)["__init__"].__doc__:
        doc += "\n" + vars(obj)["__init__"].__doc__
    return doc


PUBLIC = _public_objects()


def test_the_public_surface_is_found():
    names = {name for name, _ in PUBLIC}
    for expected in ("fastnn.BatchNorm2d", "fastnn.network.Network.fit", "fastnn.optim.AdamW",
                     "fastnn.kernels.im2col", "fastnn.callbacks.BackupAndRestore",
                     "fastnn.datasets.load_mnist"):
        assert expected in names
    assert len(PUBLIC) > 100


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_docstring_names_every_parameter(name, obj):
    doc = _doc(obj)
    assert doc.strip(), f"{name} has no docstring"
    missing = [p for p in _parameters(obj) if not re.search(rf"(?<![\w.]){re.escape(p)}\b", doc)]
    assert not missing, f"{name}: the docstring does not mention parameter(s) {missing}"


@pytest.mark.parametrize("name", [n for n in fastnn.layers.__all__ if n != "Layer"])
def test_layer_docstring_gives_shapes(name):
    doc = _doc(getattr(fastnn.layers, name))
    assert re.search(r"[Ii]nput", doc) and re.search(r"[Oo]utput", doc), \
        f"{name}: the docstring does not say what its input and output are"
    assert "(N" in doc, f"{name}: the docstring gives no batch-first shape such as (N, ...)"


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_napoleon_reads_the_parameters_section(name, obj):
    """What the API reference shows: every entry napoleon takes from a "Parameters" section
    is a parameter (a paragraph left below that section without a header of its own, e.g.
    "Shapes", would be read as more parameters and rendered as such)."""
    napoleon = pytest.importorskip("sphinx.ext.napoleon")
    config = napoleon.Config(napoleon_custom_sections=[("Shapes", "notes_style")])
    text = str(napoleon.NumpyDocstring(inspect.getdoc(obj) or "", config))
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for entry in re.findall(r"^:param ([^:]*):", text, re.M):
        for word in (w.strip() for w in entry.split(",")):
            assert word.isidentifier() and (word in params or any_keyword), \
                f"{name}: napoleon reads {word!r} as a parameter"
