"""fastnn.backend: backend choice, array-module dispatch, and the fallback when
the compiled extension is missing."""
import numpy as np
import pytest

from fastnn import backend

from _helpers import run_python


def test_available_lists_both_cpu_backends():
    names = backend.available()
    assert names[:2] == ["cpu", "numpy"]
    assert backend.compiled_error() is None


def test_use_switches_and_rejects_unknown_names():
    previous = backend.current()
    try:
        backend.use("numpy")
        assert backend.current() == "numpy"
        backend.use("cpu")
        assert backend.current() == "cpu"
        with pytest.raises(ValueError, match="'cpu' or 'numpy'.*'cuda'"):
            backend.use("cuda")
        assert backend.current() == "cpu"
    finally:
        backend.use(previous)


def test_array_module_and_devices_for_numpy_arrays():
    x = np.ones(3)
    assert backend.get_array_module(x) is np
    assert not backend.is_cuda_array(x)
    assert backend.device_of(x) == "cpu"
    assert backend.to_device(x, "cpu") is x
    assert backend.to_device(None, "cuda") is None
    with pytest.raises(ValueError, match="'cpu' or 'cuda'.*'tpu'"):
        backend.to_device(x, "tpu")


def test_to_cuda_without_a_gpu_says_why():
    if backend.cupy() is not None:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError, match="cuda"):
        backend.to_device(np.ones(3), "cuda")


def test_import_works_without_the_compiled_extension():
    """A missing/broken extension: one clear warning, the reference kernels, no 'cpu'."""
    result = run_python("""
        import sys, warnings
        sys.modules["fastnn.kernels._cpu"] = None      # makes the import fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastnn
            import fastnn.kernels
            from fastnn import backend
        mine = [w for w in caught if "fastnn" in str(w.message)]
        assert len(mine) == 1, [str(w.message) for w in caught]
        message = str(mine[0].message)
        assert "compiled CPU kernels" in message and "NumPy reference" in message, message
        assert "cpu" not in backend.available() and backend.current() == "numpy"
        assert backend.compiled_error() is not None
        try:
            backend.use("cpu")
        except ValueError as exc:
            assert "unavailable" in str(exc)
        else:
            raise AssertionError("use('cpu') accepted without the extension")
        import numpy as np
        y = fastnn.kernels.conv2d_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))
        assert y.tolist() == [[[[4.0, 4.0], [4.0, 4.0]]]]
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wait_policy_is_scoped_to_the_extension_import():
    """fastnn sets OMP_WAIT_POLICY only while libgomp loads, and never over the user's."""
    result = run_python("""
        import os
        import fastnn
        print(os.environ.get("OMP_WAIT_POLICY"))
    """, env={"OMP_WAIT_POLICY": "active"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "active"      # the user's choice, untouched
    result = run_python("import os, fastnn; print(os.environ.get('OMP_WAIT_POLICY'))",
                        drop=("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
