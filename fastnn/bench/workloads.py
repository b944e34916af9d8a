"""The benchmark workloads W0-W7 (float32, batch-first, NCHW, synthetic data).

Each ``build_*`` function returns the workload's metrics, each holding one
``Impl`` per implementation: ``fastnn`` (and variants), the ``numpy`` peer,
the ``torch`` peer, and a limit where one applies (``copy`` for ReLU, the W0
``sgemm`` for the dense layer). All implementations of a workload read the
same input arrays. An implementation that cannot be built here (PyTorch not
installed, a fastnn piece missing) becomes an ``Impl`` with ``run=None`` and
the reason in ``note``; the table shows it instead of failing.

``--device cuda`` builds the same workloads on CuPy arrays / ``net.to("cuda")``
against PyTorch CUDA (no NumPy peer); W3 and W4 then take the sizes of the
issue-5 GPU targets (LeNet at batch 256; conv N=64, C=K=128).
"""
import inspect
from dataclasses import dataclass, field

import numpy as np

from .timing import Impl, Metric

F32 = np.float32


@dataclass
class Config:
    quick: bool = False
    device: str = "cpu"                       # "cpu" or "cuda"
    compare: frozenset = frozenset({"numpy", "torch"})
    seed: int = 0
    _torch: object = field(default=None, repr=False)

    @property
    def cuda(self):
        return self.device == "cuda"

    def rng(self):
        return np.random.default_rng(self.seed)

    # --- device helpers ---------------------------------------------------
    def fastnn_array(self, a):
        """A workload input as fastnn gets it: NumPy on the CPU, CuPy on CUDA."""
        if not self.cuda:
            return a
        from fastnn import backend
        return backend.to_device(a, "cuda")

    def fastnn_sync(self):
        if self.cuda:
            import cupy
            return cupy.cuda.Device().synchronize
        return None

    def torch(self):
        """The torch module when the torch peer is wanted and installed, else None."""
        if "torch" not in self.compare:
            return None
        if self._torch is None:
            try:
                import torch
            except ImportError:
                self._torch = False
            else:
                self._torch = torch
        return self._torch or None

    def torch_sync(self):
        return self._torch.cuda.synchronize if self.cuda else None

    def numpy_peer(self):
        """The NumPy peer runs in CPU runs only (on CUDA it would time the host)."""
        return "numpy" in self.compare and not self.cuda


def _guarded(name, work, factory, sync=None):
    """Build an Impl from ``factory() -> run``; a failure becomes a note in the table."""
    try:
        run = factory()
    except Exception as exc:  # a missing fastnn piece or peer must not stop the others
        return Impl(name, None, work, note=f"unavailable: {type(exc).__name__}: {exc}")
    return Impl(name, run, work, sync=sync)


def _torch_missing(cfg, name="torch"):
    reason = "not requested" if "torch" not in cfg.compare else "PyTorch is not installed"
    return Impl(name, None, 1.0, note=reason)


def _torch_impl(cfg, work, factory):
    torch = cfg.torch()
    if torch is None:
        return _torch_missing(cfg) if "torch" in cfg.compare else None
    return _guarded("torch", work, lambda: factory(torch), sync=cfg.torch_sync())


def _keep(*impls):
    return [i for i in impls if i is not None]


# --- W0 -------------------------------------------------------------------------

def _sgemm_fastnn(cfg, a, b):
    """C = A @ B through the BLAS fastnn's kernels use (scipy's, via cython_blas;
    cuBLAS through CuPy on CUDA), with no copy: F-ordered views of the
    transposes give (A @ B).T in Fortran order, i.e. A @ B in C order."""
    if cfg.cuda:
        import cupy
        ad, bd = cfg.fastnn_array(a), cfg.fastnn_array(b)
        out = cupy.empty((a.shape[0], b.shape[1]), F32)
        return lambda: cupy.matmul(ad, bd, out=out)
    from scipy.linalg.blas import sgemm
    a_t, b_t = a.T, b.T
    c_t = np.empty((b.shape[1], a.shape[0]), F32, order="F")
    return lambda: sgemm(1.0, b_t, a_t, beta=0.0, c=c_t, overwrite_c=1)


def build_w0(cfg):
    n = 2048
    rng = cfg.rng()
    a = rng.standard_normal((n, n), dtype=F32)
    b = rng.standard_normal((n, n), dtype=F32)
    gflop = 2 * n ** 3 / 1e9
    impls = [_guarded("fastnn", gflop, lambda: _sgemm_fastnn(cfg, a, b), sync=cfg.fastnn_sync())]
    if cfg.numpy_peer():
        c = np.empty((n, n), F32)
        impls.append(Impl("numpy", lambda: np.matmul(a, b, out=c), gflop))

    def torch_mm(torch):
        ta, tb = (torch.from_numpy(a).to(cfg.device), torch.from_numpy(b).to(cfg.device))
        tc = torch.empty((n, n), device=cfg.device)
        return lambda: torch.mm(ta, tb, out=tc)
    impls = _keep(*impls, _torch_impl(cfg, gflop, torch_mm))
    return [Metric("W0", "sgemm 2048^3", "GFLOP/s", "rate", impls,
                   description="C = A @ B, 2048^3 float32: the practical BLAS peak")]


# --- W1 -------------------------------------------------------------------------

def build_w1(cfg):
    from fastnn import kernels
    batch, n_in, n_out = 256, 1024, 1024
    rng = cfg.rng()
    x = rng.standard_normal((batch, n_in), dtype=F32)
    W = rng.standard_normal((n_in, n_out), dtype=F32) * F32(0.03)
    b = rng.standard_normal(n_out, dtype=F32)
    grad_y = rng.standard_normal((batch, n_out), dtype=F32)
    gflop = 6 * batch * n_in * n_out / 1e9

    def fastnn_dense():
        xd, Wd, bd, gd = (cfg.fastnn_array(v) for v in (x, W, b, grad_y))

        def run():
            kernels.dense_forward(xd, Wd, bd)
            kernels.dense_backward(gd, xd, Wd)
        return run

    impls = [_guarded("fastnn", gflop, fastnn_dense, sync=cfg.fastnn_sync())]
    if cfg.numpy_peer():
        from . import numpy_peers
        peer = numpy_peers.Dense(x, W, b)
        impls.append(Impl("numpy", lambda: peer.forward_backward(grad_y), gflop))

    def torch_dense(torch):
        from . import torch_peers
        tx, tW, tb, tg = (torch_peers.to_tensor(v, cfg.device) for v in (x, W, b, grad_y))
        return lambda: torch_peers.dense_forward_backward(tx, tW, tb, tg)
    impls = _keep(*impls, _torch_impl(cfg, gflop, torch_dense))
    # the target is relative to the BLAS peak of the same run: time W0's sgemm here too
    a = rng.standard_normal((2048, 2048), dtype=F32)
    impls.append(_guarded("sgemm (W0)", 2 * 2048 ** 3 / 1e9, lambda: _sgemm_fastnn(cfg, a, a),
                          sync=cfg.fastnn_sync()))
    return [Metric("W1", "dense fwd+bwd", "GFLOP/s", "rate", impls,
                   targets=(("sgemm (W0)", 0.9, ">= 0.9 x sgemm"),),
                   description="Dense 1024->1024, batch 256, forward + (dX, dW, db); 6*B*I*O flop")]


# --- W2 / W7: the MLP ---------------------------------------------------------------

MLP_SIZES = (784, 256, 128, 10)


def _fastnn_mlp(cfg, seed=0):
    import fastnn as fn
    layers = []
    for i in range(len(MLP_SIZES) - 1):
        layers.append(fn.Dense(MLP_SIZES[i], MLP_SIZES[i + 1], seed=seed + i))
        if i < len(MLP_SIZES) - 2:
            layers.append(fn.ReLU())
    net = fn.Network(layers)
    if cfg.cuda:
        net.to("cuda")
    return net


def _mnist_like(cfg, n):
    rng = cfg.rng()
    x = rng.random((n, 1, 28, 28), dtype=F32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def build_w2(cfg):
    import fastnn as fn
    n = 3200 if cfg.quick else 60000
    batch = 128
    x4, y = _mnist_like(cfg, n)
    x = x4.reshape(n, 784)

    def fastnn_fit():
        net = _fastnn_mlp(cfg)
        net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.01, momentum=0.9))
        xd, yd = cfg.fastnn_array(x), cfg.fastnn_array(y)
        return lambda: net.fit(xd, yd, epochs=1, batch_size=batch, shuffle=False, verbose=0)

    impls = [_guarded("fastnn", n, fastnn_fit, sync=cfg.fastnn_sync())]
    if cfg.numpy_peer():
        from . import numpy_peers
        model = numpy_peers.mlp(MLP_SIZES)
        impls.append(Impl("numpy", lambda: model.fit_epoch(x, y, batch, 0.01, 0.9), n))

    def torch_fit(torch):
        from . import torch_peers
        torch.manual_seed(cfg.seed)
        model = torch_peers.mlp(MLP_SIZES).to(cfg.device)
        trainer = torch_peers.Trainer(model, torch_peers.to_tensor(x, cfg.device),
                                      torch_peers.to_tensor(y, cfg.device), batch)
        return trainer.epoch
    impls = _keep(*impls, _torch_impl(cfg, n, torch_fit))
    return [Metric("W2", f"MLP train ({n} samples)", "samples/s", "rate", impls,
                   targets=(("numpy", 1.3, ">= 1.3 x numpy"), ("torch", 2.5, ">= 2.5 x torch")),
                   description="MLP 784-256-128-10 ReLU, softmax CE, SGD momentum 0.9, batch 128, "
                               "one pass in order")]


def build_w7(cfg):
    n_batch = 10000
    n_single = 300 if cfg.quick else 2000
    rng = cfg.rng()
    x = rng.random((n_batch, 784), dtype=F32)
    metrics = []

    nets = {}

    def fastnn_net():
        if "net" not in nets:
            nets["net"] = _fastnn_mlp(cfg)
        return nets["net"]

    def fastnn_batch():
        net, xd = fastnn_net(), cfg.fastnn_array(x)
        return lambda: net.predict(xd)

    def fastnn_single(method):
        net, xd = fastnn_net(), cfg.fastnn_array(x[:n_single])
        if method == "predict":
            def run():
                for i in range(n_single):
                    net.predict(xd[i:i + 1])
        else:
            def run():
                for i in range(n_single):
                    net.forward(xd[i:i + 1], training=False)
        return run

    numpy_model = None
    if cfg.numpy_peer():
        from . import numpy_peers
        numpy_model = numpy_peers.mlp(MLP_SIZES)

    def numpy_single():
        for i in range(n_single):
            numpy_model.forward(x[i:i + 1])

    def torch_model(torch):
        from . import torch_peers
        torch.manual_seed(cfg.seed)
        model = torch_peers.mlp(MLP_SIZES).to(cfg.device).eval()
        return model, torch_peers.to_tensor(x, cfg.device)

    def torch_batch(torch):
        model, tx = torch_model(torch)

        def run():
            with torch.no_grad():
                model(tx)
        return run

    def torch_single(torch):
        model, tx = torch_model(torch)

        def run():
            with torch.no_grad():
                for i in range(n_single):
                    model(tx[i:i + 1])
        return run

    sync = cfg.fastnn_sync()
    batch_impls = [_guarded("fastnn", n_batch, fastnn_batch, sync=sync)]
    if numpy_model is not None:
        batch_impls.append(Impl("numpy", lambda: numpy_model.forward(x), n_batch))
    batch_impls = _keep(*batch_impls, _torch_impl(cfg, n_batch, torch_batch))
    metrics.append(Metric("W7", "MLP infer batch 10000", "samples/s", "rate", batch_impls,
                          description="MLP 784-256-128-10 inference, 10,000 samples in one batch"))

    single = [_guarded("fastnn", n_single, lambda: fastnn_single("predict"), sync=sync),
              _guarded("fastnn.forward", n_single, lambda: fastnn_single("forward"), sync=sync)]
    if numpy_model is not None:
        single.append(Impl("numpy", numpy_single, n_single))
    single = _keep(*single, _torch_impl(cfg, n_single, torch_single))
    metrics.append(Metric("W7", "MLP infer batch 1", "us/sample", "time", single, scale=1e6,
                          targets=(("torch", 3.0, "<= 1/3 torch latency"),
                                   ("numpy", 1 / 0.6, "<= 0.6 x numpy latency")),
                          description=f"one sample at a time ({n_single} samples): "
                                      "fastnn = net.predict(x[i:i+1]), fastnn.forward = "
                                      "net.forward(x[i:i+1], training=False)"))
    return metrics


# --- W3 LeNet ---------------------------------------------------------------------------

def _fastnn_lenet(cfg):
    import fastnn as fn
    net = fn.Network([
        fn.Conv2D(1, 6, 5, padding=2, seed=0), fn.ReLU(), fn.MaxPool2D(2),
        fn.Conv2D(6, 16, 5, seed=1), fn.ReLU(), fn.MaxPool2D(2), fn.Flatten(),
        fn.Dense(400, 120, seed=2), fn.ReLU(), fn.Dense(120, 84, seed=3), fn.ReLU(),
        fn.Dense(84, 10, seed=4)])
    if cfg.cuda:
        net.to("cuda")
    return net


def build_w3(cfg):
    import fastnn as fn
    batch = 256 if cfg.cuda else 64
    n = batch * (5 if cfg.quick else 100)
    x, y = _mnist_like(cfg, n)

    def fastnn_fit():
        net = _fastnn_lenet(cfg)
        net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.01, momentum=0.9))
        xd, yd = cfg.fastnn_array(x), cfg.fastnn_array(y)
        return lambda: net.fit(xd, yd, epochs=1, batch_size=batch, shuffle=False, verbose=0)

    impls = [_guarded("fastnn", n, fastnn_fit, sync=cfg.fastnn_sync())]
    if cfg.numpy_peer():
        from . import numpy_peers
        model = numpy_peers.lenet()
        impls.append(Impl("numpy", lambda: model.fit_epoch(x, y, batch, 0.01, 0.9), n))

    def torch_fit(torch):
        from . import torch_peers
        torch.manual_seed(cfg.seed)
        model = torch_peers.lenet().to(cfg.device)
        trainer = torch_peers.Trainer(model, torch_peers.to_tensor(x, cfg.device),
                                      torch_peers.to_tensor(y, cfg.device), batch)
        return trainer.epoch
    impls = _keep(*impls, _torch_impl(cfg, n, torch_fit))
    return [Metric("W3", f"LeNet-5 train b{batch} ({n} samples)", "samples/s", "rate", impls,
                   targets=(("torch", 1.25, ">= 1.25 x torch"), ("numpy", 3.0, ">= 3 x numpy")),
                   description=f"LeNet-5 on 1x28x28, SGD momentum 0.9, batch {batch}, in order")]


# --- W4 conv ------------------------------------------------------------------------------

def build_w4(cfg):
    from fastnn import kernels
    n, c, h, w = (64, 128, 32, 32) if cfg.cuda else (32, 64, 32, 32)
    if cfg.quick and not cfg.cuda:
        n = 8       # the NumPy reference's 0.8 s per N=32 call took a sixth of --quick
    k = c
    rng = cfg.rng()
    x = rng.standard_normal((n, c, h, w), dtype=F32)
    W = rng.standard_normal((k, c, 3, 3), dtype=F32) * F32(0.05)
    b = rng.standard_normal(k, dtype=F32)
    grad_y = rng.standard_normal((n, k, h, w), dtype=F32)
    gflop = 3 * 2 * n * k * c * 9 * h * w / 1e9

    def fastnn_conv():
        xd, Wd, bd, gd = (cfg.fastnn_array(v) for v in (x, W, b, grad_y))

        def run():
            kernels.conv2d_forward(xd, Wd, bd, 1, 1)
            kernels.conv2d_backward(gd, xd, Wd, 1, 1)
        return run

    impls = [_guarded("fastnn", gflop, fastnn_conv, sync=cfg.fastnn_sync())]
    if cfg.numpy_peer():
        from fastnn.kernels import _reference

        def numpy_conv():
            _reference.conv2d_forward(x, W, b, (1, 1), (1, 1))
            _reference.conv2d_backward(grad_y, x, W, (1, 1), (1, 1))
        impls.append(Impl("numpy", numpy_conv, gflop, note="fastnn's NumPy reference (im2col)"))

    def torch_conv(torch):
        from . import torch_peers
        tx, tW, tb, tg = (torch_peers.to_tensor(v, cfg.device) for v in (x, W, b, grad_y))
        return lambda: torch_peers.conv_forward_backward(tx, tW, tb, tg, 1)
    impls = _keep(*impls, _torch_impl(cfg, gflop, torch_conv))
    return [Metric("W4", f"conv3x3 N{n} C=K={c} {h}x{w} fwd+bwd", "GFLOP/s", "rate", impls,
                   targets=(("torch", 1.0, ">= 1.0 x torch"),),
                   description="3*2*N*K*C*9*H*W flop (forward, grad_x, grad_W)")]


# --- W5 max pool ----------------------------------------------------------------------------

def build_w5(cfg):
    from fastnn import kernels
    shape = (32, 64, 64, 64)
    rng = cfg.rng()
    x = rng.standard_normal(shape, dtype=F32)
    grad_y = rng.standard_normal((32, 64, 32, 32), dtype=F32)
    gb_forward = 4 * (x.size + grad_y.size) / 1e9        # read x, write y

    def fastnn_fwd():
        xd = cfg.fastnn_array(x)
        return lambda: kernels.maxpool2d_forward(xd, 2, 2, 2)

    def fastnn_fwd_bwd():
        xd, gd = cfg.fastnn_array(x), cfg.fastnn_array(grad_y)

        def run():
            _, argmax = kernels.maxpool2d_forward(xd, 2, 2, 2)
            kernels.maxpool2d_backward(gd, argmax, shape)
        return run

    sync = cfg.fastnn_sync()
    fwd = [_guarded("fastnn", gb_forward, fastnn_fwd, sync=sync)]
    both = [_guarded("fastnn", 1, fastnn_fwd_bwd, sync=sync)]
    if cfg.numpy_peer():
        from . import numpy_peers
        peer = numpy_peers.MaxPool2x2(x)
        fwd.append(Impl("numpy", peer.forward, gb_forward, note="strided reshape + max"))
        both.append(Impl("numpy", lambda: peer.forward_backward(grad_y), 1))

    def torch_fwd(torch):
        from . import torch_peers
        tx = torch_peers.to_tensor(x, cfg.device)
        return lambda: torch_peers.maxpool_forward(tx)

    def torch_both(torch):
        from . import torch_peers
        tx, tg = torch_peers.to_tensor(x, cfg.device), torch_peers.to_tensor(grad_y, cfg.device)
        return lambda: torch_peers.maxpool_forward_backward(tx, tg)
    fwd = _keep(*fwd, _torch_impl(cfg, gb_forward, torch_fwd))
    both = _keep(*both, _torch_impl(cfg, 1, torch_both))
    return [Metric("W5", "maxpool 2x2 forward", "GB/s", "rate", fwd,
                   description="32x64x64x64 float32; bytes = input read + output written"),
            Metric("W5", "maxpool 2x2 fwd+bwd", "ms", "time", both, scale=1e3,
                   targets=(("torch", 4.0, ">= 4 x torch"),),
                   description="forward (values + argmax) then backward")]


# --- W6 ReLU --------------------------------------------------------------------------------

def build_w6(cfg):
    from fastnn import kernels
    size = 16 * 2 ** 20
    rng = cfg.rng()
    x = rng.standard_normal(size, dtype=F32)
    grad_y = rng.standard_normal(size, dtype=F32)
    y = np.maximum(x, 0)
    gb_fwd, gb_bwd = 2 * 4 * size / 1e9, 3 * 4 * size / 1e9    # bytes read + written
    sync = cfg.fastnn_sync()

    # Where the kernels take a caller's buffer (``out=``), use it, as the NumPy peer
    # does: a fresh 64 MB result costs its page faults on every call.
    takes_out = all("out" in inspect.signature(f).parameters
                    for f in (kernels.relu_forward, kernels.relu_backward))
    fastnn_note = "out= buffer" if takes_out else "allocates its result"

    def fastnn_fwd():
        xd = cfg.fastnn_array(x)
        if takes_out:
            out = xd.copy()
            return lambda: kernels.relu_forward(xd, out=out)
        return lambda: kernels.relu_forward(xd)

    def fastnn_bwd():
        gd, yd = cfg.fastnn_array(grad_y), cfg.fastnn_array(y)
        if takes_out:
            out = gd.copy()
            return lambda: kernels.relu_backward(gd, yd, out=out)
        return lambda: kernels.relu_backward(gd, yd)

    def copy():
        if cfg.cuda:
            import cupy
            src = cfg.fastnn_array(x)
            dst = cupy.empty_like(src)
            return lambda: cupy.copyto(dst, src)
        dst = np.empty_like(x)
        return lambda: np.copyto(dst, x)

    fwd = [_guarded("fastnn", gb_fwd, fastnn_fwd, sync=sync)]
    bwd = [_guarded("fastnn", gb_bwd, fastnn_bwd, sync=sync)]
    fwd[0].note = bwd[0].note = fwd[0].note or fastnn_note
    if cfg.numpy_peer():
        from . import numpy_peers
        peer = numpy_peers.ReLU(x)
        fwd.append(Impl("numpy", peer.forward, gb_fwd, note="np.maximum(x, 0, out=y)"))
        bwd.append(Impl("numpy", lambda: peer.backward(grad_y), gb_bwd))

    def torch_fwd(torch):
        tx = torch.from_numpy(x).to(cfg.device)
        return lambda: torch.relu(tx)          # allocates, as torch.relu does

    def torch_bwd(torch):
        from . import torch_peers
        tg, ty = torch.from_numpy(grad_y).to(cfg.device), torch.from_numpy(y).to(cfg.device)
        return lambda: torch_peers.relu_backward(tg, ty)
    fwd = _keep(*fwd, _torch_impl(cfg, gb_fwd, torch_fwd))
    bwd = _keep(*bwd, _torch_impl(cfg, gb_bwd, torch_bwd))
    fwd.append(_guarded("copy", gb_fwd, copy, sync=sync))
    bwd.append(_guarded("copy", gb_fwd, copy, sync=sync))
    targets = (("copy", 0.8, ">= 0.8 x copy GB/s"), ("torch", 1.0, ">= 1.0 x torch"))
    return [Metric("W6", "ReLU forward 16M", "GB/s", "rate", fwd, targets=targets,
                   description="bytes = 4*n read + 4*n written; copy = np.copyto (one "
                               "thread), the limit the issue names"),
            Metric("W6", "ReLU backward 16M", "GB/s", "rate", bwd, targets=targets,
                   description="grad_x = grad_y * (y > 0); bytes = 8*n read + 4*n written")]


WORKLOADS = {"W0": build_w0, "W1": build_w1, "W2": build_w2, "W3": build_w3,
             "W4": build_w4, "W5": build_w5, "W6": build_w6, "W7": build_w7}
