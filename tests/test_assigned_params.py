"""Parameters a user assigns (``layer.params["W"] = ...``) are checked before any compiled
kernel reads them: a wrong shape, dtype or layout gets an error naming the layer, the
parameter, what was expected and what came; never a crash or a wrong number. The bad
assignments run in a child process, where a crash would show as a signal."""
import numpy as np
import pytest

import fastnn as fn
from _helpers import run_python

BAD_ASSIGNMENTS = r"""
import numpy as np
import fastnn as fn
rng = np.random.default_rng(0)
x2 = rng.standard_normal((5, 4)).astype(np.float32)
x4 = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
cases = [
    # (make layer, input, store, name, value, error, words in the message)
    (lambda: fn.Dense(4, 6), x2, "params", "W", rng.standard_normal((6, 4)).astype(np.float32),
     ValueError, ["Dense(4 -> 6)", "'W'", "(4, 6)", "(6, 4)", "transpose"]),
    (lambda: fn.Dense(4, 6), x2, "params", "b", np.zeros(6, np.float64), TypeError,
     ["'b'", "float32", "float64"]),
    (lambda: fn.Dense(4, 6), x2, "params", "b", np.zeros(3, np.float32), ValueError,
     ["'b'", "(6,)", "(3,)"]),
    (lambda: fn.Dense(4, 6), x2, "params", "W", [[1.0] * 6] * 4, TypeError, ["'W'", "list"]),
    (lambda: fn.Conv2D(3, 5, 3), x4, "params", "W", np.ones((5, 3, 1, 1), np.float32),
     ValueError, ["Conv2D", "'W'", "(5, 3, 3, 3)", "(5, 3, 1, 1)"]),
    (lambda: fn.Conv2D(3, 5, 3), x4, "params", "b", np.zeros(4, np.float32), ValueError,
     ["'b'", "(5,)"]),
    (lambda: fn.BatchNorm2d(3), x4, "params", "gamma", np.ones(1, np.float32), ValueError,
     ["BatchNorm2d(3)", "'gamma'", "(3,)", "(1,)"]),
    (lambda: fn.BatchNorm2d(3), x4, "buffers", "running_var", np.ones(2, np.float32), ValueError,
     ["'running_var'", "(3,)"]),
]
for make, x, store, name, value, error, words in cases:
    for training in (True, False):
        layer = make()
        getattr(layer, store)[name] = value
        try:
            layer.forward(x, training=training)
        except error as exc:
            assert all(w in str(exc) for w in words), (str(exc), words)
        else:
            raise SystemExit(f"no {error.__name__} for {name} = {value!r}")
print("refused", len(cases))
"""


def test_bad_assigned_parameters_are_refused_without_a_crash():
    result = run_python(BAD_ASSIGNMENTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused 8" in result.stdout


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
def test_non_contiguous_parameters_give_the_contiguous_result(backend_name):
    """A Fortran-ordered or strided weight is used as its C-contiguous copy."""
    previous = fn.backend.current()
    fn.backend.use(backend_name)
    try:
        rng = np.random.default_rng(1)
        conv, ref = fn.Conv2D(3, 4, 3, seed=0), fn.Conv2D(3, 4, 3, seed=0)
        x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
        big = np.zeros((4, 3, 3, 6), np.float32)
        big[..., ::2] = ref.params["W"]
        conv.params["W"] = big[..., ::2]                     # a strided view
        np.testing.assert_array_equal(conv.forward(x), ref.forward(x))
        dense, dref = fn.Dense(5, 3, seed=0), fn.Dense(5, 3, seed=0)
        dense.params["W"] = np.asfortranarray(dref.params["W"])
        x2 = rng.standard_normal((4, 5)).astype(np.float32)
        np.testing.assert_array_equal(dense.forward(x2), dref.forward(x2))
        assert dense.params["W"].flags.c_contiguous
    finally:
        fn.backend.use(previous)


def test_checked_once_per_assigned_array():
    """The identity of the checked arrays is kept: the next forward does not check again,
    an in-place change is fine, a new array is checked again."""
    dense = fn.Dense(3, 2)
    x = np.ones((1, 3), np.float32)
    dense.forward(x)
    checked = dense._checked
    dense.params["W"][...] = 1.0
    dense.forward(x)
    assert dense._checked is checked
    dense.params["W"] = np.ones((3, 2), np.float32)
    dense.forward(x)
    assert dense._checked is not checked and dense._checked[0][2] is dense.params["W"]
