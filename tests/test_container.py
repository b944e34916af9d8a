"""Network as a container of its layers: len, indexing, slicing, iteration, repr/summary."""
import numpy as np
import pytest

import fastnn as fn


def net3():
    return fn.Network([fn.Dense(4, 5, seed=0), fn.ReLU(), fn.Dense(5, 2, seed=1)])


def test_len_index_iter():
    net = net3()
    assert len(net) == 3
    assert net[0] is net.layers[0] and net[-1] is net.layers[2]
    assert list(net) == net.layers
    assert len(fn.Network()) == 0 and bool(fn.Network())
    with pytest.raises(IndexError, match="index 3 out of range for 3 layers"):
        net[3]
    with pytest.raises(TypeError, match="integers or slices, got str"):
        net["0"]


def test_slice_shares_layers_not_compile_state():
    net = net3()
    net.compile("cross_entropy", optimizer=fn.optim.SGD(lr=0.1))
    head = net[:2]
    assert isinstance(head, fn.Network) and len(head) == 2
    assert head[0] is net[0] and head[1] is net[1]
    assert head.optimizer is None and head.loss_fn is None
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(head.forward(x), np.maximum(net[0].forward(x), 0))
    # weights are shared: training the whole network changes the slice's output
    before = head.forward(x).copy()
    net.fit(x, np.array([0, 1, 0]), epochs=1, verbose=0)
    assert not np.array_equal(before, head.forward(x))
    assert len(net[1:]) == 2 and len(net[5:]) == 0


def test_repr_is_summary_and_fits_100_columns():
    net = fn.Network([fn.Conv2D(3, 8, 3, seed=0), fn.ReLU(), fn.Flatten(),
                      fn.Dense(8 * 30 * 30, 10, seed=1)])
    text = repr(net)
    assert text == net.summary() and "Conv2D" in text and "total parameters" in text
    net.summary(input_shape=(3, 32, 32))
    for line in net.summary(input_shape=(3, 32, 32)).splitlines():
        assert len(line) <= 100, line


def test_long_layer_reprs_are_cut_to_fit():
    class Wordy(fn.ReLU):
        def __repr__(self):
            return "Wordy(" + "x" * 300 + ")"
    text = fn.Network([Wordy()]).summary()
    assert "Wordy(" in text and "..." in text
    assert max(len(line) for line in text.splitlines()) <= 100
