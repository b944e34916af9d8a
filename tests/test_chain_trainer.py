"""fit's compiled step for Dense/ReLU networks trained with cross-entropy
(kernels._cpu.DenseChainTrainer): the same bits as the step through the layers."""
import numpy as np
import pytest

import fastnn as fn
import fastnn.network as network_module
from fastnn import backend, optim

pytestmark = pytest.mark.skipif(backend._compiled is None, reason="needs the compiled kernels")


def data(n=300, dim=30, classes=7, dtype="float32", one_hot=False, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(dtype)
    y = rng.integers(0, classes, n)
    return x, (np.eye(classes, dtype=dtype)[y] if one_hot else y)


def chain(dtype="float32", bias=True, relu_last=False, softmax=False, fc=False):
    first = fn.FCLayer(30, 40, seed=1, dtype=dtype) if fc else fn.Dense(30, 40, seed=1,
                                                                        dtype=dtype)
    layers = [first, fn.ReLU(), fn.Dense(40, 24, bias=bias, seed=2, dtype=dtype), fn.ReLU(),
              fn.Dense(24, 7, seed=3, dtype=dtype)]
    if relu_last:
        layers.append(fn.ReLU())
    if softmax:
        layers.append(fn.Softmax())
    return fn.Network(layers)


class Counting:
    """Wraps _cpu.DenseChainTrainer to count the steps it takes."""

    def __init__(self, monkeypatch):
        self.steps = 0
        real = backend._compiled.DenseChainTrainer
        counter = self

        class Trainer(real):
            def step(self, *args):
                counter.steps += 1
                return super().step(*args)
        monkeypatch.setattr(backend._compiled, "DenseChainTrainer", Trainer)


def fit_both(monkeypatch, make_net, make_opt, x, y, fits=2, **fit_kw):
    """The same network trained with the compiled step and through the layers:
    ``[(net, histories), ...]`` for both, and the trainer's step count."""
    counting = Counting(monkeypatch)
    runs = []
    for compiled in (True, False):
        monkeypatch.setattr(network_module, "_COMPILED_TRAIN_STEP", compiled)
        net = make_net()
        net.compile("cross_entropy", make_opt())
        runs.append((net, [net.fit(x, y, verbose=0, seed=0, **fit_kw).history
                           for _ in range(fits)]))
    return runs, counting.steps


def assert_same_state(a, b):
    """Parameters, gradients and what forward kept: bit for bit."""
    for la, lb in zip(a.layers, b.layers):
        for store in ("params", "grads"):
            da, db = getattr(la, store, {}), getattr(lb, store, {})
            assert sorted(da) == sorted(db)
            for k in da:
                np.testing.assert_array_equal(da[k], db[k], err_msg=f"{la}: {store}[{k}]")
        for attr in ("input", "output"):
            if hasattr(lb, attr):
                np.testing.assert_array_equal(getattr(la, attr), getattr(lb, attr))


OPTIMIZERS = {
    "momentum": lambda: optim.SGD(lr=0.05, momentum=0.9),
    "plain": lambda: optim.SGD(lr=0.1),
    "nesterov-l1-l2": lambda: optim.SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01,
                                        l1=0.001),
    "schedule": lambda: optim.SGD(lr=0.05, momentum=0.9, schedule=optim.StepLR(1, 0.5)),
    "adam": lambda: optim.Adam(lr=0.01),      # the trainer's gradients, Adam's own step
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_step_gives_the_bits_of_the_layers(monkeypatch, opt, dtype):
    x, y = data(dtype=dtype)
    (a, ha), (b, hb) = fit_both(monkeypatch, lambda: chain(dtype), OPTIMIZERS[opt], x, y,
                                epochs=2, batch_size=64)[0]
    assert ha == hb            # losses and accuracies, epoch by epoch, over two fits
    assert_same_state(a, b)


@pytest.mark.parametrize("case", [
    dict(batch_size=1, n=40), dict(batch_size=37), dict(batch_size="full"),
    dict(one_hot=True), dict(bias=False), dict(relu_last=True), dict(softmax=True),
    dict(fc=True), dict(shuffle=False)])
def test_compiled_step_on_batch_sizes_targets_and_layer_variants(monkeypatch, case):
    case = dict(case)
    net_kw = {k: case.pop(k) for k in ("bias", "relu_last", "softmax", "fc") if k in case}
    x, y = data(n=case.pop("n", 300), one_hot=case.pop("one_hot", False))
    runs, steps = fit_both(monkeypatch, lambda: chain(**net_kw), OPTIMIZERS["momentum"], x, y,
                           epochs=2, **case)
    (a, ha), (b, hb) = runs
    assert steps > 0
    assert ha == hb
    assert_same_state(a, b)


def test_compiled_step_runs_only_where_it_applies(monkeypatch):
    x, y = data()
    counting = Counting(monkeypatch)
    net = chain()
    net.compile("cross_entropy", optim.SGD(lr=0.05))
    net.fit(x, y, epochs=1, batch_size=100, verbose=0)
    assert counting.steps == 3
    for net, xx, yy in [
            (fn.Network([fn.Dense(30, 7), fn.Tanh()]), x, y),                  # not Dense/ReLU
            (fn.Network([fn.Flatten(), fn.Dense(30, 7)]), x.reshape(-1, 5, 6), y)]:
        net.compile("cross_entropy", optim.SGD(lr=0.05))
        net.fit(xx, yy, epochs=1, batch_size=100, verbose=0)
    net = chain()
    net.compile("mse", optim.SGD(lr=0.05))
    net.fit(x, np.eye(7)[y], epochs=1, batch_size=100, verbose=0)
    assert counting.steps == 3


def test_a_weight_it_cannot_take_mid_fit_hands_over_to_the_layers(monkeypatch):
    """A callback makes a weight Fortran-ordered after the first epoch: the trainer
    declines it, the layers go on (and make it contiguous again), same bits as a fit
    through the layers all along."""
    x, y = data()

    class Fortran:
        def on_epoch_end(self, net, epoch, logs):
            if epoch == 1:
                net.layers[2].params["W"] = np.asfortranarray(net.layers[2].params["W"])

    runs = []
    for compiled in (True, False):
        monkeypatch.setattr(network_module, "_COMPILED_TRAIN_STEP", compiled)
        net = chain()
        net.compile("cross_entropy", OPTIMIZERS["nesterov-l1-l2"]())
        runs.append((net, net.fit(x, y, epochs=3, batch_size=64, verbose=0, seed=0,
                                  callbacks=[Fortran()]).history))
    (a, ha), (b, hb) = runs
    assert ha == hb
    assert_same_state(a, b)


def test_a_declined_step_leaves_the_optimizer_untouched():
    """The last layer's weight is Fortran-ordered: the trainer declines the step after
    looking at the layers before it, and must not have made their momentum buffers
    (the layers' SGD step would take them as filled, from a first step never run)."""
    net = chain()
    net.layers[4].params["W"] = np.asfortranarray(net.layers[4].params["W"])
    opt = OPTIMIZERS["momentum"]()
    params = [layer.params[name] for layer, name in net.parameters()]
    opt._prepare(params)
    trainer = backend._compiled.DenseChainTrainer(net._get_plan().dense_chain, 8, np.float32)
    x, y = data(n=8)
    before = [p.copy() for p in params]
    assert trainer.step(x, y.astype(np.int64), opt) is None
    assert opt.state == [None] * len(params)
    for p, q in zip(params, before):
        np.testing.assert_array_equal(p, q)
    y[3] = 7                                          # a label out of range: the same
    net.layers[4].params["W"] = np.ascontiguousarray(net.layers[4].params["W"])
    with pytest.raises(ValueError):
        trainer.step(x, y.astype(np.int64), opt)
    assert opt.state == [None] * len(params)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_a_loss_that_is_not_finite_leaves_parameters_and_optimizer_as_before(monkeypatch, opt):
    x, y = data(n=64)
    x[40] = np.inf                       # the second batch's loss is NaN
    for compiled in (True, False):
        monkeypatch.setattr(network_module, "_COMPILED_TRAIN_STEP", compiled)
        net = chain()
        optimizer = OPTIMIZERS[opt]()
        net.compile("cross_entropy", optimizer)
        before = [net.layers[i].params[k].copy() for i in (0, 2, 4) for k in ("W", "b")]
        with pytest.raises(FloatingPointError, match="epoch 1, batch 2"):
            # all_finite would refuse inf in x at fit's entry: the check is skipped here
            monkeypatch.setattr(fn.kernels, "all_finite", lambda a: True)
            net.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
        after = [net.layers[i].params[k] for i in (0, 2, 4) for k in ("W", "b")]
        assert any(not np.array_equal(p, q) for p, q in zip(before, after))   # batch 1 ran
        if compiled:
            compiled_after = [p.copy() for p in after]
            compiled_state = optimizer.state
        else:
            for p, q in zip(compiled_after, after):
                np.testing.assert_array_equal(p, q)
            for s, t in zip(compiled_state, optimizer.state):
                np.testing.assert_array_equal(s, t)


def test_trainer_declines_what_does_not_fit():
    """step returns None (the caller runs the layers) instead of reading a wrong buffer."""
    net = chain()
    plan = net._get_plan()
    trainer = backend._compiled.DenseChainTrainer(net._get_plan().dense_chain, 8, np.float32)
    x, y = data(n=8)
    assert isinstance(trainer.step(x, y.astype(np.int64)), float)
    assert trainer.step(x.astype(np.float64), y) is None                 # dtype
    assert trainer.step(np.asfortranarray(x), y) is None                 # layout
    assert trainer.step(np.concatenate([x, x]), np.concatenate([y, y])) is None   # > capacity
    assert trainer.step(x[:, :29].copy(), y) is None                     # features
    assert trainer.step(x, y.astype(np.int32)) is None                   # label dtype
    assert trainer.step(x, y[:7].copy()) is None                         # label count
    assert trainer.step(x, np.eye(6, dtype=np.float32)[y % 6]) is None   # one-hot width
    for bad in (-1, 7):                                                  # 7 classes
        labels = y.astype(np.int64)
        labels[3] = bad
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
            trainer.step(x, labels)
    net.layers[2].params["W"] = net.layers[2].params["W"][:, :20].copy()    # shapes do not chain
    assert trainer.step(x, y) is None
    assert plan.dense_chain is not None
    with pytest.raises(TypeError, match="float32 or float64"):
        backend._compiled.DenseChainTrainer(plan.dense_chain, 8, np.float16)


@pytest.fixture(params=[True, False], ids=["avx512-rows", "portable"])
def avx512_rows(request):
    """float32 softmax rows (and finiteness checks) in AVX-512 lanes where the CPU has
    them, or on the portable loops."""
    if backend._compiled._set_avx512_rows(request.param) != request.param:
        backend._compiled._set_avx512_rows(True)
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    backend._compiled._set_avx512_rows(True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("classes", [7, 40])
def test_predicted_classes_are_numpy_argmax_of_the_logits(avx512_rows, dtype, one_hot,
                                                           classes):
    """fit's accuracy reads the trainer's classes: ties go to the first class, as
    numpy.argmax (two equal weight columns tie every row; a final ReLU ties zeros)."""
    for relu_last in (False, True):
        net = fn.Network([fn.Dense(30, 24, seed=1, dtype=dtype), fn.ReLU(),
                          fn.Dense(24, classes, seed=2, dtype=dtype)]
                         + ([fn.ReLU()] if relu_last else []))
        W, b = net.layers[2].params["W"], net.layers[2].params["b"]
        W[:, classes - 2], b[classes - 2] = W[:, 2], b[2]
        trainer = backend._compiled.DenseChainTrainer(net._get_plan().dense_chain, 50, dtype)
        x, y = data(n=50, dtype=dtype, classes=classes, one_hot=one_hot)
        assert trainer.step(x, y if one_hot else y.astype(np.int64)) is not None
        logits = trainer.output(1, 50, relu=True)
        np.testing.assert_array_equal(trainer.predicted(50), np.argmax(logits, axis=1))
        assert (np.argmax(logits, axis=1) != classes - 2).all()
        assert len(set(np.argmax(logits, axis=1))) > 2


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_compiled_step_gives_the_bits_of_the_layers_on_both_softmax_rows(monkeypatch,
                                                                          avx512_rows, opt):
    x, y = data()
    (a, ha), (b, hb) = fit_both(monkeypatch, chain, OPTIMIZERS[opt], x, y, epochs=2,
                                batch_size=37)[0]
    assert ha == hb
    assert_same_state(a, b)


@pytest.mark.parametrize("seed", range(8))
def test_random_chains_train_like_the_layers(monkeypatch, seed):
    """Random depths, widths, biases, ReLU placements, batch sizes, dtypes, targets
    and optimizers: the compiled step and the layers give the same bits."""
    rng = np.random.default_rng(100 + seed)
    dtype = ("float32", "float64")[seed % 2]
    widths = [int(w) for w in rng.integers(1, 70, size=int(rng.integers(2, 5)))]
    classes = int(rng.integers(2, 12))
    relus = [bool(r) for r in rng.integers(0, 2, size=len(widths))]
    biases = [bool(b) for b in rng.integers(0, 2, size=len(widths))]

    def make():
        layers = []
        for k, (w_in, w_out) in enumerate(zip(widths, widths[1:] + [classes])):
            layers.append(fn.Dense(w_in, w_out, bias=biases[k], seed=seed * 10 + k,
                                   dtype=dtype))
            if relus[k]:
                layers.append(fn.ReLU())
        return fn.Network(layers)

    n = int(rng.integers(1, 300))
    x = rng.standard_normal((n, widths[0])).astype(dtype)
    y = rng.integers(0, classes, n)
    if seed % 3 == 0:
        y = np.eye(classes)[y]
    opt = (OPTIMIZERS["nesterov-l1-l2"], OPTIMIZERS["momentum"], OPTIMIZERS["plain"],
           OPTIMIZERS["adam"])[seed % 4]
    runs, steps = fit_both(monkeypatch, make, opt, x, y, fits=2, epochs=2,
                           batch_size=int(rng.integers(1, 80)))
    (a, ha), (b, hb) = runs
    assert steps > 0
    assert ha == hb
    assert_same_state(a, b)


@pytest.mark.parametrize("opt", ["momentum", "nesterov-l1-l2", "plain"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_w2_sized_chain_splits_its_gemms_and_trains_like_the_layers(monkeypatch, opt, dtype):
    """W2's 784-256-128-10 MLP at batch 128: the GEMMs split over the pool, fc1's over
    K blocks, the biases and ReLUs on their tiles; the same bits as the layers."""
    rng = np.random.default_rng(7)
    x = rng.random((128 * 3 + 50, 784)).astype(dtype)
    y = rng.integers(0, 10, len(x))

    def make():
        return fn.Network([fn.Dense(784, 256, seed=1, dtype=dtype), fn.ReLU(),
                           fn.Dense(256, 128, seed=2, dtype=dtype), fn.ReLU(),
                           fn.Dense(128, 10, seed=3, dtype=dtype)])
    runs, steps = fit_both(monkeypatch, make, OPTIMIZERS[opt], x, y, fits=1, epochs=2,
                           batch_size=128, shuffle=False)
    (a, ha), (b, hb) = runs
    assert steps == 8
    assert ha == hb
    assert_same_state(a, b)
