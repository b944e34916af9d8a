"""Where tests find the real MNIST / Fashion-MNIST files, and the skip for when they are absent."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_root():
    """$FASTNN_DATA, else <repo>/../shared/data; None when neither holds MNIST."""
    for root in (os.environ.get("FASTNN_DATA"), REPO.parent / "shared" / "data"):
        if root and (pathlib.Path(root) / "mnist").is_dir():
            return str(root)
    return None


needs_mnist = pytest.mark.skipif(shared_data_root() is None,
                                 reason="MNIST files not found ($FASTNN_DATA or ../shared/data)")
