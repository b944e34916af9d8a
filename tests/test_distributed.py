"""fastnn.distributed: p processes (mpiexec -n 2 and -n 3, started here in a subprocess with
a timeout) train exactly as one process with the same global batch (float64, 1e-10), the
ranks end identical, per-rank BatchNorm does not match (negative control), one rank's
exception ends the job; in one process DistributedOptimizer is the optimizer it wraps."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastnn as fn
from fastnn import distributed as dist

from _helpers import PACKAGE_PARENT, run_python

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_cases  # noqa: E402

TIMEOUT = 120


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
        return dist.mpiexec_command(1, [])[0]
    except (ImportError, FileNotFoundError):
        return None


needs_mpi = pytest.mark.skipif(_mpiexec() is None, reason="needs mpi4py and mpiexec "
                               "(pip install 'fastnn[mpi]')")


def _launch(n, args, timeout=TIMEOUT):
    """``mpiexec -n n python args...`` on the fastnn under test -> CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run(dist.mpiexec_command(n, [sys.executable] + args), capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def reference():
    """Every case trained in this process with the plain optimizer."""
    record = {}
    for name in dist_cases.CASES:
        record.update(dist_cases.run(name))
    return record


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    """Every case trained by ``mpiexec -n p``: the record of each rank."""
    if _mpiexec() is None:
        pytest.skip("needs mpi4py and mpiexec (pip install 'fastnn[mpi]')")
    out = tmp_path_factory.mktemp(f"dist{request.param}")
    done = _launch(request.param, [os.path.join(HERE, "dist_cases.py"), str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(request.param)]


def _worst(got, ref, case):
    keys = [k for k in ref if k.startswith(case + ".")]
    assert keys and all(k in got for k in keys)
    return max(float(np.max(np.abs(got[k] - ref[k]), initial=0.0)) for k in keys)


@pytest.mark.parametrize("case", ["sgd_mlp", "bn_dropout_adam", "conv_bn2d", "sgd_weighted",
                                  "sgd_stream"])
def test_p_ranks_train_as_one_process(ranks, reference, case):
    """Weights, buffers (BatchNorm running statistics), history and evaluate: to 1e-10,
    with an uneven last batch (and an empty share on one of 3 ranks)."""
    for record in ranks:
        assert _worst(record, reference, case) < 1e-10
    history = [k for k in reference if k.startswith(case + ".history.")]
    assert {k.rsplit(".", 1)[1] for k in history} == {"loss", "accuracy", "val_loss",
                                                      "val_accuracy"}


def test_divergence_stops_every_rank_as_one_process(ranks):
    """The global loss decides: the rank without the bad sample stops too, at the same
    batch, with the parameters of the step before (as in one process)."""
    ref = dist_cases.run_diverging()
    assert "batch 3 of 5" in str(ref["diverge.message"])
    number = re.compile(r"loss became ([^,;]+)")
    ref_loss = float(number.search(str(ref["diverge.message"])).group(1))
    for record in ranks:
        message = str(record["diverge.message"])    # the same, the loss to round-off
        assert number.sub("", message) == number.sub("", str(ref["diverge.message"]))
        assert float(number.search(message).group(1)) == pytest.approx(ref_loss, rel=1e-12)
        for key in ("diverge.W", "diverge.b"):
            np.testing.assert_allclose(record[key], ref[key], rtol=0, atol=1e-10)


def test_ranks_hold_identical_weights(ranks):
    for record in ranks[1:]:
        for key, value in ranks[0].items():
            if not key.startswith("bn_per_rank."):     # its running statistics are per rank
                np.testing.assert_array_equal(record[key], value, err_msg=key)


def test_per_rank_batchnorm_does_not_match_one_process(ranks, reference):
    """The negative control: without synchronized=True the statistics are the shares'."""
    for record in ranks:
        assert _worst(record, reference, "bn_per_rank") > 1e-6


@needs_mpi
@pytest.mark.parametrize("launch", [["-m", "mpi4py"], []], ids=["python -m mpi4py", "python"])
def test_one_rank_raising_ends_the_job(tmp_path, launch):
    """Rank 1 raises at its second epoch while the others wait in the next allreduce: the
    job ends with a non-zero status (MPI_Abort from mpi4py's runner, or from the
    excepthook dist.init installs), long before the timeout."""
    try:
        done = _launch(3, launch + [os.path.join(HERE, "dist_cases.py"), str(tmp_path),
                                    "--raise-on", "1"], timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the job still ran after {exc.timeout} s; its stderr: {exc.stderr!r}")
    said = f"exit status {done.returncode}; stderr: {done.stderr[-3000:]!r}"
    assert done.returncode != 0, said
    assert "rank 1 fails on purpose" in done.stderr + done.stdout, said


def test_init_outside_mpiexec_is_one_process():
    code = """
        from fastnn import distributed as dist
        print(dist.init(), dist.rank(), dist.size())
    """
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "1"]
    done = run_python("import sys; sys.modules['mpi4py'] = None\n" + code.replace("    ", ""))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "1"]


def _train(opt, x, y):
    net = fn.Network([fn.Dense(5, 8, dtype="float64", seed=0), fn.ReLU(), fn.Dropout(0.2),
                      fn.Dense(8, 3, dtype="float64", seed=1)])
    net.compile(loss="cross_entropy", optimizer=opt)
    hist = net.fit(x, y, epochs=3, batch_size=7, seed=3, verbose=0)
    step = net.train_step(x[:4], y[:4])
    return [p.copy() for layer in net.layers for p in layer.params.values()], hist.history, step


@pytest.mark.parametrize("make", [
    lambda: fn.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, clipnorm=0.5),
    lambda: fn.optim.Adam(lr=0.01, global_clipnorm=1.0,
                          schedule=fn.optim.OneCycleLR(0.05, epochs=3, steps_per_epoch=3)),
    lambda: fn.optim.RMSprop(lr=0.01, momentum=0.5, schedule=fn.optim.StepLR(1, 0.5)),
], ids=["sgd", "adam-onecycle", "rmsprop-steplr"])
def test_one_process_distributed_optimizer_is_the_wrapped_one(make):
    """Size 1: the same weights, history and train_step, bit for bit; the wrapper keeps
    the class (isinstance, saving's name), the schedule (bound to the wrapper), lr and
    state_dict."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((19, 5)), rng.integers(0, 3, 19)
    plain, wrapped = make(), dist.DistributedOptimizer(make())
    assert isinstance(wrapped, type(plain)) and isinstance(wrapped, dist.DistributedOptimizer)
    assert type(wrapped).__name__ == type(plain).__name__
    assert dist.DistributedOptimizer(wrapped) is wrapped
    if wrapped.schedule is not None:
        assert wrapped.schedule.optimizer is wrapped
    a, b = _train(plain, x, y), _train(wrapped, x, y)
    for p, q in zip(a[0], b[0]):
        np.testing.assert_array_equal(p, q)
    assert a[1] == b[1] and a[2] == b[2]
    assert wrapped.lr == plain.lr
    sa, sb = plain.state_dict(), wrapped.state_dict()
    for s, t in zip(sa["state"], sb["state"]):
        for u, v in zip(s, t):
            np.testing.assert_array_equal(u, v)


def test_saved_distributed_network_loads_as_its_optimizer(tmp_path):
    net = fn.Network([fn.Dense(3, 2, dtype="float64", seed=0)])
    net.compile(loss="mse", optimizer=dist.DistributedOptimizer(fn.optim.SGD(momentum=0.9)))
    net.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=1, verbose=0)
    net.save(tmp_path / "m.npz")
    loaded = fn.Network.load(tmp_path / "m.npz")
    assert type(loaded.optimizer) is fn.optim.SGD
    np.testing.assert_array_equal(loaded.optimizer.state[0], net.optimizer.state[0])


def test_synchronized_batchnorm_alone_is_batchnorm():
    """In one process the synchronized path gives plain BatchNorm's forward, backward and
    running statistics (float64), and it round-trips through get_config."""
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((6, 4, 3, 3))
    plain, synced = fn.BatchNorm2d(4, dtype="float64"), fn.BatchNorm2d(4, dtype="float64",
                                                                      synchronized=True)
    np.testing.assert_allclose(synced.forward(x), plain.forward(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(synced.backward(g), plain.backward(g), rtol=0, atol=1e-12)
    for k in ("gamma", "beta"):
        np.testing.assert_allclose(synced.grads[k], plain.grads[k], rtol=0, atol=1e-12)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(synced.buffers[k], plain.buffers[k], rtol=0, atol=1e-12)
    assert fn.BatchNorm2d.from_config(synced.get_config()).synchronized
    with pytest.raises(ValueError, match="more than 1 value per channel in the global batch"):
        fn.BatchNorm1d(4, dtype="float64", synchronized=True).forward(np.ones((1, 4)))


def test_dropout_offset_takes_the_larger_batch_masks():
    """A share starting at sample s gets rows s.. of the whole batch's mask."""
    x = np.ones((10, 3, 4))
    whole, part = fn.Dropout(0.5, seed=5), fn.Dropout(0.5, seed=5)
    full = whole.forward(x)
    part.sample_offset = 6
    np.testing.assert_array_equal(part.forward(x[6:]), full[6:])


def test_mpiexec_command_names_a_launcher(monkeypatch):
    monkeypatch.setenv("FASTNN_MPIEXEC", "/opt/my/mpiexec")
    assert dist.mpiexec_command(2, ["python", "x.py"]) == [
        "/opt/my/mpiexec", "-launcher", "fork", "-n", "2", "python", "x.py"]
    monkeypatch.delenv("FASTNN_MPIEXEC")
    monkeypatch.setenv("PATH", "")
    if not os.access(os.path.join(os.path.dirname(sys.executable), "mpiexec"), os.X_OK):
        with pytest.raises(FileNotFoundError, match="no mpiexec"):
            dist.mpiexec_command(2, [])


class _Recorder:
    """Stands in for the MPI communicator (bcast) and for CuPy's NcclCommunicator."""

    def __init__(self, *args):
        self.args, self.calls = args, []

    def bcast(self, *args, **kwargs):
        if len(args) == 1:                 # mpi4py's pickled bcast of the unique id
            self.calls.append(("mpi_bcast", args, kwargs))
            return args[0]
        self.calls.append(("bcast", args))

    def allReduce(self, *args):
        self.calls.append(("allReduce", args))


def test_nccl_collectives_follow_cupys_signatures(monkeypatch):
    """No GPU needed: with CuPy's NCCL bindings, a 2-rank job's collectives on a device
    buffer make the communicator from rank 0's unique id (bytes, over MPI) and call
    ``allReduce(send, recv, count, type, op, stream)`` / ``bcast(buf, count, type, root,
    stream)`` in place on the current stream, as CuPy's NcclCommunicator takes them."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        pytest.skip("needs CuPy")
    if not nccl.available:
        pytest.skip("needs CuPy's NCCL bindings (pip install nvidia-nccl-cu13)")
    made = []
    monkeypatch.setattr(nccl, "NcclCommunicator", lambda *a: made.append(_Recorder(*a)) or made[-1])
    monkeypatch.setattr(nccl, "get_unique_id", lambda: b"u" * 128)
    stream = type("Stream", (), {"ptr": 77})()
    fake_cupy = type("CuPy", (), {"cuda": type("Cuda", (), {
        "get_current_stream": staticmethod(lambda: stream)})})
    monkeypatch.setattr(fn.backend, "cupy", lambda: fake_cupy)
    mpi = _Recorder()
    monkeypatch.setattr(dist._World, "comm", mpi)
    monkeypatch.setattr(dist._World, "size", 2)
    monkeypatch.setattr(dist._World, "nccl", None)
    buf = type("DeviceArray", (), {"data": type("Memory", (), {"ptr": 4096})(), "size": 5,
                                   "dtype": np.dtype(np.float32)})()
    assert dist.allreduce(buf) is buf and dist.broadcast(buf) is buf
    assert mpi.calls == [("mpi_bcast", (b"u" * 128,), {"root": 0})]
    assert len(made) == 1 and made[0].args == (2, b"u" * 128, 0)
    assert made[0].calls == [("allReduce", (4096, 4096, 5, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 77)),
                             ("bcast", (4096, 5, nccl.NCCL_FLOAT32, 0, 77))]


@pytest.mark.skipif(fn.backend.cupy() is None, reason="needs a CUDA device")
def test_gpu_packed_step_in_one_process():
    """On the GPU the packed buffer is a CuPy array (NCCL's path in a job); in one process
    the wrapped step gives the plain optimizer's weights."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((19, 5)), rng.integers(0, 3, 19)
    nets = []
    for opt in (fn.optim.SGD(lr=0.1, momentum=0.9),
                dist.DistributedOptimizer(fn.optim.SGD(lr=0.1, momentum=0.9))):
        net = fn.Network([fn.Dense(5, 3, dtype="float64", seed=0)]).to("cuda")
        net.compile(loss="cross_entropy", optimizer=opt)
        net.fit(x, y, epochs=2, batch_size=7, seed=3, verbose=0)
        nets.append(net.to("cpu"))
    np.testing.assert_allclose(nets[0].layers[0].params["W"], nets[1].layers[0].params["W"],
                               rtol=0, atol=1e-12)


@needs_mpi
def test_fastnn_train_distributed_prints_once_and_matches_one_process():
    args = ["-m", "fastnn.train", "circles", "--epochs", "2", "--distributed"]
    done = _launch(2, args)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run([sys.executable] + args[:-1], capture_output=True, text=True,
                         timeout=TIMEOUT, env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT))
    epochs = [line.rsplit("lr", 1)[0] for line in done.stdout.splitlines()
              if line.startswith("epoch")]
    assert len(epochs) == 2          # rank 0 alone prints
    assert epochs == [line.rsplit("lr", 1)[0] for line in one.stdout.splitlines()
                      if line.startswith("epoch")]
