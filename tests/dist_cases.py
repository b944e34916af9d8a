"""The training runs of tests/test_distributed.py, run two ways: in one process with the
plain optimizer (the reference), and under ``mpiexec -n p python tests/dist_cases.py OUT``
with ``DistributedOptimizer`` (every rank writes ``OUT/rank<r>.npz``). float64 throughout.

Each case: data (N samples, a global batch that leaves an uneven last batch, with an
empty share on some rank for 3 processes), a network, an optimizer; the record holds
the weights and buffers, the history and ``evaluate`` on held-out data.
Usage: ``dist_cases.py OUT`` (every case) or ``dist_cases.py OUT --raise-on RANK [--hook]``.
"""
import sys

import numpy as np

import fastnn as fn

F64 = "float64"


def _data(n, shape, classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + shape)
    y = rng.integers(0, classes, n)
    return x, y


def _mlp(bn, synchronized=False):
    # no bias before a BatchNorm: its gradient is zero up to round-off, which Adam's
    # normalised step would turn into updates of the order of lr
    layers = [fn.Dense(6, 16, dtype=F64, seed=1, bias=not bn)]
    if bn:
        layers.append(fn.BatchNorm1d(16, dtype=F64, synchronized=synchronized))
    layers += [fn.ReLU()]
    if bn:
        layers.append(fn.Dropout(0.3))
    layers += [fn.Dense(16, 3, dtype=F64, seed=2), fn.Softmax()]
    return fn.Network(layers)


def _conv():
    return fn.Network([fn.Conv2D(1, 3, 3, dtype=F64, seed=3),
                       fn.BatchNorm2d(3, dtype=F64, synchronized=True), fn.ReLU(),
                       fn.MaxPool2D(2), fn.Flatten(), fn.Dense(27, 3, dtype=F64, seed=4),
                       fn.Softmax()])


# name -> (network, optimizer, data (N, sample shape), batch size, epochs)
CASES = {
    "sgd_mlp": (lambda: _mlp(False),
                lambda: fn.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
                (50, (6,)), 16, 3),
    "bn_dropout_adam": (lambda: _mlp(True, synchronized=True),
                        lambda: fn.optim.Adam(lr=0.01), (50, (6,)), 16, 3),
    # per-sample weights: each share's loss sum(w_i loss_i) / n_r scaled to / n_global
    "sgd_weighted": (lambda: _mlp(False), lambda: fn.optim.SGD(lr=0.1, momentum=0.9),
                     (47, (6,)), 10, 2),
    # an iterable of (xb, yb) global batches: each rank slices its share of each
    "sgd_stream": (lambda: _mlp(False), lambda: fn.optim.SGD(lr=0.1, momentum=0.9),
                   (47, (6,)), 10, 2),
    "conv_bn2d": (_conv, lambda: fn.optim.SGD(lr=0.05, momentum=0.5), (30, (1, 8, 8)), 8, 2),
    # negative control: per-rank BatchNorm statistics differ from the global batch's
    "bn_per_rank": (lambda: _mlp(True, synchronized=False),
                    lambda: fn.optim.Adam(lr=0.01), (48, (6,)), 16, 3),
}


def run(name, wrap=None):
    """Train case ``name``; ``wrap`` wraps the optimizer (DistributedOptimizer). -> record."""
    make_net, make_opt, (n, shape), batch, epochs = CASES[name]
    x, y = _data(n + 20, shape, 3, seed=len(name))
    net = make_net()
    opt = make_opt()
    net.compile(loss="cross_entropy", optimizer=wrap(opt) if wrap else opt)
    if wrap is not None and fn.distributed.rank() != 0:     # rank 0's weights are broadcast
        for layer in net.layers:
            for a in layer.params.values():
                a += 1.0
    weights = np.linspace(0.2, 2.0, n) if name.endswith("weighted") else None
    val = (x[n:], y[n:])
    if name.endswith("stream"):
        stream = [(x[i:min(i + batch, n)], y[i:min(i + batch, n)]) for i in range(0, n, batch)]
        hist = net.fit(stream, None, epochs=epochs, seed=7, verbose=0, validation_data=val)
    else:
        hist = net.fit(x[:n], y[:n], epochs=epochs, batch_size=batch, seed=7, verbose=0,
                       validation_data=val, sample_weight=weights)
    record = {f"{name}.arr{i}": a for i, a in enumerate(
        a for layer in net.layers for store in ("params", "buffers")
        for a in (getattr(layer, store, None) or {}).values())}
    for key, values in hist.history.items():
        record[f"{name}.history.{key}"] = np.array(values)
    for key, value in net.evaluate(x[n:], y[n:]).items():
        record[f"{name}.evaluate.{key}"] = np.array(value)
    return record


def run_diverging(wrap=None):
    """MSE regression whose 3rd batch holds one target of 1e9 (in one rank's share): the
    global loss passes fit's divergence bound there, so every rank raises the same
    FloatingPointError with the parameters of the 2nd step. -> record."""
    x, y = _data(40, (6,), 3, seed=1)
    target = np.eye(3)[y]
    target[2 * 8 + 5] = 1e9
    net = fn.Network([fn.Dense(6, 3, dtype=F64, seed=5)])
    opt = fn.optim.SGD(lr=0.01)
    net.compile(loss="mse", optimizer=wrap(opt) if wrap else opt)
    try:
        net.fit(x, target, epochs=1, batch_size=8, shuffle=False, verbose=0)
        message = "no error"
    except FloatingPointError as exc:
        message = str(exc)
    return {"diverge.message": np.array(message), "diverge.W": net.layers[0].params["W"],
            "diverge.b": net.layers[0].params["b"]}


def main(argv):
    from fastnn import distributed as dist
    dist.init()
    out = argv[0]
    if "--raise-on" in argv:       # one rank fails in its second epoch; the others go on
        bad = int(argv[argv.index("--raise-on") + 1])

        class Fail(fn.callbacks.Callback):
            def on_epoch_begin(self, network, epoch):
                if epoch == 2 and dist.rank() == bad:
                    raise RuntimeError(f"rank {bad} fails on purpose")
        x, y = _data(64, (6,), 3, 0)
        net = _mlp(False)
        net.compile(loss="cross_entropy", optimizer=dist.DistributedOptimizer(fn.optim.SGD()))
        net.fit(x, y, epochs=1000, batch_size=8, seed=0, verbose=0, callbacks=[Fail()])
        return
    record = {}
    for name in CASES:
        record.update(run(name, dist.DistributedOptimizer))
    record.update(run_diverging(dist.DistributedOptimizer))
    np.savez(f"{out}/rank{dist.rank()}.npz", **record)


if __name__ == "__main__":
    main(sys.argv[1:])
