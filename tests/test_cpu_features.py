"""FASTNN_CPU_FEATURES: the cap on the compiled kernels' run-time CPU checks (read once,
at import). Under "avx2" no AVX-512 path is applicable (as on a CPU without AVX-512),
under "portable" no AVX2 + FMA one either (the direct conv), and the kernels that have
such paths still match the NumPy reference; an unknown value stops the import with an
error naming the variable. Each case runs in a fresh interpreter."""
import json

import pytest

from _helpers import run_python
from fastnn import backend

if "cpu" not in backend.available():
    pytest.skip("compiled kernels not built", allow_module_level=True)

# in the child: the variants that apply, and kernels with AVX-512 / AVX2 paths against
# the reference (float32: the dtype those paths exist for; odd sizes)
CHECK = """
import json
import numpy as np
import fastnn.kernels as K
from fastnn.kernels import _cpu, _reference as R, variants

f32 = np.float32
rng = np.random.default_rng(0)
close = dict(rtol=1e-5, atol=1e-5)
x, W, b = (rng.standard_normal(s).astype(f32) for s in ((67, 301), (301, 129), (129,)))
np.testing.assert_allclose(K.dense_forward(x, W, b), R.dense_forward(x, W, b), **close)
z, labels = rng.standard_normal((37, 11)).astype(f32), rng.integers(0, 11, 37)
loss, grad = K.softmax_cross_entropy(z, labels)
want_loss, want_grad = R.softmax_cross_entropy(z, labels)
np.testing.assert_allclose(loss, want_loss, **close)
np.testing.assert_allclose(grad, want_grad, **close)
p, g, buf = (rng.standard_normal(1037).astype(f32) for _ in range(3))
p_ref, buf_ref = p.copy(), buf.copy()
K.sgd_step(p, g, buf, lr=0.1, momentum=0.9)
R.sgd_step(p_ref, g, buf_ref, 0.1, 0.9, 0.0, 0.0, False)
np.testing.assert_allclose(p, p_ref, **close)
d = rng.standard_normal((5, 331)).astype(f32)
for got, want in zip(_cpu.dropout_forward(d, 0.3, 7), R.dropout_forward(d, 0.3, 7)):
    np.testing.assert_array_equal(got, want)
assert K.all_finite(d) and not K.all_finite(np.append(d, np.inf).astype(f32))
conv = dict(x_shape=(2, 1, 28, 28), w_shape=(6, 1, 5, 5), dtype=f32)
xc, wc = rng.standard_normal((2, 1, 28, 28)).astype(f32), rng.standard_normal((6, 1, 5, 5)).astype(f32)
np.testing.assert_allclose(K.conv2d_forward(xc, wc), R.conv2d_forward(xc, wc, None, (1, 1), (0, 0)),
                           rtol=1e-4, atol=1e-4)
print(json.dumps({"cap": _cpu.cpu_features(), "own_sgemm": _cpu.own_sgemm_supported(),
                  "gemm": variants.applicable("gemm", m=67, n=129, k=301, dtype=f32),
                  "row_kernels": variants.applicable("row_kernels"),
                  "sgd_step": variants.applicable("sgd_step"),
                  "chosen_rows": variants.chosen("row_kernels"),
                  "conv": variants.applicable("conv2d_forward", **conv)}))
"""


@pytest.mark.parametrize("cap", ["avx2", "portable"])
def test_cap_leaves_no_avx512_variant_and_kernels_match_reference(cap):
    run = run_python(CHECK, env={"FASTNN_CPU_FEATURES": cap})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["cap"] == cap and got["own_sgemm"] is False
    assert got["gemm"] == ["blas"]
    assert got["row_kernels"] == got["sgd_step"] == ["portable"]
    assert got["chosen_rows"] == "portable"
    if cap == "portable":
        assert "direct" not in got["conv"]
    assert "columns" in got["conv"]


def test_forcing_an_avx512_variant_under_the_cap_raises():
    run = run_python("""
        from fastnn.kernels import variants
        for op, name in (("gemm", "own"), ("row_kernels", "avx512"), ("sgd_step", "avx512")):
            try:
                with variants.force(op, name):
                    pass
            except ValueError as exc:
                print(exc)
            else:
                print("forced", op, name)
        """, env={"FASTNN_CPU_FEATURES": "avx2"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3 and all("cannot run here" in line for line in lines), lines


def test_unknown_value_names_the_variable():
    run = run_python("import fastnn", env={"FASTNN_CPU_FEATURES": "avx1024"})
    assert run.returncode != 0
    assert "FASTNN_CPU_FEATURES must be one of ['native', 'avx2', 'portable'], got 'avx1024'" \
        in run.stderr


def test_default_is_native():
    run = run_python("from fastnn.kernels import _cpu; print(_cpu.cpu_features())",
                     drop=("FASTNN_CPU_FEATURES",))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "native"
