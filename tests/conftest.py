"""Fixtures shared by the test files."""
import pytest

from fastnn import backend


@pytest.fixture(params=["numpy", "cpu"])
def cpu_backend(request):
    """Run the test on each CPU implementation (NumPy reference and compiled), restoring the
    backend in use after."""
    previous = backend.current()
    backend.use(request.param)
    yield request.param
    backend.use(previous)
