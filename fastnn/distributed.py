"""Data-parallel training over MPI (mpi4py + MPICH), NCCL through CuPy on GPUs.

Every process (rank) holds a full replica of the network and trains on its contiguous
share of every global batch; before each update the gradients of all ranks are summed
by ONE allreduce of one packed, preallocated buffer (the buffer API: ``Allreduce`` on
NumPy arrays, NCCL's ``allReduce`` on CuPy arrays on the current stream). Each rank's
loss gradient is scaled by its share ``n_r / n_global``, so that the sum is the
gradient of the global batch's mean loss: p processes train exactly as one process
with the same global batch. See API.md, "Distributed training"::

    from fastnn import distributed as dist      # pip install "fastnn[mpi]"
    dist.init()
    net.compile(loss="cross_entropy", optimizer=dist.DistributedOptimizer(fn.optim.SGD(lr=0.1)))
    net.fit(x, y, epochs=5, batch_size=256, seed=0)   # run: mpiexec -n 4 python -m mpi4py train.py

Without mpi4py, or outside mpiexec, ``init()`` gives one process (size 1) and
everything here is a no-op. ``mpiexec_command`` builds the local ``mpiexec`` command
line the tests and benchmarks use.
"""
import os
import shutil
import sys

import numpy as np

from . import backend, data, optim

__all__ = ["init", "rank", "size", "allreduce", "broadcast", "DistributedOptimizer",
           "mpiexec_command"]


class _World:
    """The job: the MPI communicator (None: one process), rank, size, NCCL communicator."""
    comm = None
    rank = 0
    size = 1
    nccl = None              # cupy.cuda.nccl.NcclCommunicator, made at the first GPU collective


def init():
    """Join the job started by ``mpiexec`` (MPI_COMM_WORLD); returns ``size()``.

    Without mpi4py, or in a process not started by mpiexec, the job is this process
    alone (size 1). With several processes: an uncaught exception on any rank aborts
    the whole job (``MPI_Abort``, non-zero exit status) instead of leaving the others
    waiting in a collective, and where CuPy sees GPUs, rank r uses GPU r % count."""
    if _World.comm is not None:
        return _World.size
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):      # no mpi4py, or no MPI library for it
        return 1
    comm = MPI.COMM_WORLD
    _World.comm, _World.rank, _World.size = comm, comm.Get_rank(), comm.Get_size()
    if _World.size > 1:
        sys.excepthook = _abort_on_exception
        _use_gpu_of_rank()
    return _World.size


def _use_gpu_of_rank():
    """Make GPU ``rank % device count`` current (before any CUDA context is made)."""
    try:
        import cupy as cp
        count = cp.cuda.runtime.getDeviceCount()
    except Exception:            # no CuPy, no driver, no device: the CPU path
        return
    if count:
        cp.cuda.Device(_World.rank % count).use()


def _abort_on_exception(exc_type, exc, tb):
    """sys.excepthook of a multi-process job: print the traceback, then end every rank."""
    sys.__excepthook__(exc_type, exc, tb)
    sys.stderr.flush()
    _World.comm.Abort(1)


def rank():
    """This process's rank in the job (0 without ``init`` or outside mpiexec)."""
    return _World.rank


def size():
    """The number of processes in the job (1 without ``init`` or outside mpiexec)."""
    return _World.size


def mpiexec_command(n, argv):
    """The command line that runs ``argv`` (a list) in ``n`` processes on this machine:
    the ``mpiexec`` beside this Python (MPICH's wheel installs it in the environment's
    bin), else the one on PATH; ``$FASTNN_MPIEXEC`` overrides it. MPICH's Hydra starts
    local processes with ``-launcher fork`` (no ssh; works as root, in containers)."""
    exe = os.environ.get("FASTNN_MPIEXEC")
    if not exe:
        local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        exe = local if os.access(local, os.X_OK) else shutil.which("mpiexec")
    if not exe:
        raise FileNotFoundError("fastnn.distributed.mpiexec_command: no mpiexec beside "
                                f"{sys.executable} nor on PATH (pip install 'fastnn[mpi]')")
    return [exe, "-launcher", "fork", "-n", str(int(n))] + list(argv)


# --- collectives: NumPy arrays over MPI, CuPy arrays over NCCL --------------------------
def allreduce(buf):
    """Sum ``buf`` (a contiguous float32/float64 NumPy or CuPy array) over all ranks, in
    place. A no-op in a job of one process."""
    if _World.size == 1:
        return buf
    if isinstance(buf, np.ndarray):
        from mpi4py import MPI
        _World.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    else:
        from cupy.cuda import nccl
        stream = backend.cupy().cuda.get_current_stream().ptr
        _nccl().allReduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_type(buf), nccl.NCCL_SUM,
                          stream)
    return buf


def broadcast(buf):
    """Copy rank 0's ``buf`` (contiguous NumPy or CuPy array) into every rank's, in place."""
    if _World.size == 1:
        return buf
    if isinstance(buf, np.ndarray):
        _World.comm.Bcast(buf, root=0)
    else:
        stream = backend.cupy().cuda.get_current_stream().ptr
        _nccl().bcast(buf.data.ptr, buf.size, _nccl_type(buf), 0, stream)
    return buf


def _nccl():
    """The job's NCCL communicator, made once from a unique id that rank 0 broadcasts."""
    if _World.nccl is None:
        from cupy.cuda import nccl
        if not nccl.available:
            raise RuntimeError("fastnn.distributed: the gradients are CuPy arrays but CuPy "
                               "finds no NCCL library (pip install nvidia-nccl-cu13, or "
                               "'fastnn[mpi,gpu]')")
        uid = nccl.get_unique_id() if _World.rank == 0 else None
        uid = _World.comm.bcast(uid, root=0)
        _World.nccl = nccl.NcclCommunicator(_World.size, uid, _World.rank)
    return _World.nccl


def _nccl_type(buf):
    from cupy.cuda import nccl
    return nccl.NCCL_FLOAT64 if buf.dtype == np.float64 else nccl.NCCL_FLOAT32


class _Packed:
    """One contiguous buffer holding arrays end to end (plus ``extra`` trailing slots),
    kept for the next call with the same shapes, dtype and device."""

    def __init__(self):
        self.key, self.buf, self.views = None, None, []

    def pack(self, arrays, extra=0):
        """Copy ``arrays`` into the buffer -> the buffer (its last ``extra`` slots free)."""
        xp = backend.get_array_module(arrays[0]) if arrays else np
        dtype = arrays[0].dtype if arrays else np.dtype(np.float64)
        key = (xp, dtype, tuple(a.shape for a in arrays), extra)
        if key != self.key:
            if any(a.dtype != dtype for a in arrays):
                raise TypeError("fastnn.distributed: the packed arrays must share one dtype, got "
                                f"{sorted({str(a.dtype) for a in arrays})}")
            total = sum(int(a.size) for a in arrays)
            self.key, self.buf = key, xp.empty(total + extra, dtype=dtype)
            self.views, at = [], 0
            for a in arrays:
                self.views.append(self.buf[at:at + a.size].reshape(a.shape))
                at += a.size
        for view, a in zip(self.views, arrays):
            view[...] = a
        return self.buf


# --- the optimizer wrapper -----------------------------------------------------------------
class DistributedOptimizer:
    """``DistributedOptimizer(optimizer)``: the same optimizer (its class, lr, schedule,
    clipping, state_dict: ``isinstance(d, SGD)`` holds) whose ``step`` first sums the
    gradients of all ranks with one allreduce of one packed buffer, the batch's loss
    riding along, then runs the wrapped rule: clipping sees the averaged gradient.

    In ``fit`` (``begin_fit``): rank 0's parameters, buffers and optimizer state are
    broadcast, the seed agreed on, and each rank trains on its contiguous share of every
    global batch (``_Shards``), its loss gradient scaled by ``n_r / n_global``. Outside
    ``fit`` (``train_step``) each rank's batch counts ``1 / size``.
    """

    _classes = {}

    def __new__(cls, optimizer):
        opt = optim.get(optimizer)
        if isinstance(opt, DistributedOptimizer):
            return opt
        base = type(opt)
        if base not in cls._classes:          # keeps the class name: saving stores it
            cls._classes[base] = type(base.__name__, (DistributedOptimizer, base),
                                      {"__module__": base.__module__})
        new = object.__new__(cls._classes[base])
        new.__dict__.update(opt.__dict__)
        new._packed, new._share, new._loss, new._max_loss = _Packed(), None, 0.0, np.inf
        new.global_loss = None          # the last step's loss over every rank's share
        _rebind(opt.schedule, opt, new)
        return new

    def __init__(self, optimizer):
        pass                                  # made by __new__

    def share(self, loss, grad, max_loss):
        """Called by ``Network._step`` between the loss and the backward: this rank's
        part ``loss * n_r / n_global`` of the global loss is kept to ride along, and the
        loss gradient is scaled by that weight; the NaN / divergence check (against
        ``max_loss``) waits for the global loss, in ``step``. -> (local loss, grad)."""
        n_r, n_global = self._share or (1, _World.size)
        weight = n_r / n_global
        self._loss, self._max_loss = (loss * weight if n_r else 0.0), max_loss
        return loss, (grad * grad.dtype.type(weight) if weight != 1 else grad)

    def step(self, params, grads, decay=None):
        """Sum ``grads`` and the batch loss over all ranks (one allreduce), check the
        global loss, then the wrapped optimizer's step on the summed gradients."""
        buf = self._packed.pack(grads, extra=2)
        hi = buf.dtype.type(self._loss)       # the loss as two numbers of the buffer's dtype
        tail = np.array([hi, self._loss - float(hi)], dtype=buf.dtype)
        buf[-2:] = tail if isinstance(buf, np.ndarray) else backend.to_device(tail, "cuda")
        allreduce(buf)
        tail = backend.to_device(buf[-2:], "cpu") if not isinstance(buf, np.ndarray) else buf[-2:]
        self.global_loss = float(tail[0]) + float(tail[1])
        if not abs(self.global_loss) <= self._max_loss:
            from .network import loss_error
            raise FloatingPointError(loss_error(self.global_loss, self._max_loss))
        super().step(params, self._packed.views, decay)

    def begin_fit(self, network, source, seed, verbose, callbacks):
        """What ``Network.fit`` runs first with this optimizer: one seed for every rank
        (rank 0's when None), rank 0's parameters, buffers and optimizer state
        broadcast, the batches sharded; only rank 0 shows progress. -> (source, seed,
        verbose)."""
        for cb in callbacks if isinstance(callbacks, (list, tuple)) else ():
            if getattr(cb, "save_freq", "epoch") != "epoch" and _World.size > 1:
                raise ValueError("Network.fit: a BackupAndRestore with save_freq in batches "
                                 "is not supported in distributed training; use "
                                 "save_freq='epoch'")
        if _World.size > 1:
            if seed is None:
                seed = int(np.random.randint(0, 2**31 - 1))
            seed = _World.comm.bcast(seed, root=0)
            self._broadcast_state(network)
        return _Shards(self, network, source), seed, (verbose if _World.rank == 0 else 0)

    def _broadcast_state(self, network):
        """Rank 0's parameters and buffers (one Bcast of one packed buffer per dtype and
        device) and optimizer state (its state_dict, once per fit)."""
        arrays = [a for layer in network.layers for store in ("params", "buffers")
                  for a in (getattr(layer, store, None) or {}).values()]
        groups = {}
        for a in arrays:
            groups.setdefault((backend.device_of(a), a.dtype), []).append(a)
        for group in groups.values():
            packed = _Packed()
            broadcast(packed.pack(group))
            for a, view in zip(group, packed.views):
                a[...] = view
        state = _World.comm.bcast(self.state_dict() if _World.rank == 0 else None, root=0)
        if _World.rank != 0:
            self.load_state_dict(state)
            self.to(network.device)


def _rebind(schedule, old, new):
    """Schedules bound to ``old`` (and a LinearWarmup's ``then``) follow ``new``, in place."""
    while schedule is not None:
        if schedule.optimizer is old:
            schedule.optimizer = new
        schedule = getattr(schedule, "then", None)


class _Shards:
    """fit's batch source under distributed training: the global batches of ``source``
    (the same permutation on every rank, from the same seed), of which this rank takes
    its contiguous share ``[n * r // p, n * (r + 1) // p)`` of each; the last, smaller
    batch is split the same way, and an empty share still takes part in every
    collective. While a batch is out, the optimizer knows its share and the network's
    Dropout / augmentation layers the share's position in the global batch."""

    def __init__(self, optimizer, network, source):
        self.optimizer, self.source = optimizer, source
        self.n_batches, self.probe = source.n_batches, source.probe
        self.validation_data = source.validation_data
        self.offset_layers = [layer for layer in network.layers
                              if hasattr(layer, "sample_offset")]
        self.shares = []            # this epoch's (start, stop) shares of each global batch

    def _global_batches(self, rng):
        """(n_global, take) per global batch: take(start, stop) gives that share."""
        src = self.source
        if not hasattr(src, "x"):                       # an iterable of batches
            for xb, yb in src.batches(rng):
                yield len(xb), lambda a, b, xb=xb, yb=yb: (xb[a:b], yb[a:b])
            return
        n = len(src.x)
        order = rng.permutation(n) if src.shuffle else np.arange(n)
        for start in range(0, n, src.batch_size):
            idx = order[start:start + src.batch_size]
            yield len(idx), lambda a, b, idx=idx: (data._take(src.x, idx[a:b]),
                                                   data._take(src.y, idx[a:b]))

    def batches(self, rng):
        """This rank's share of each global batch, as ``(xb, yb)``."""
        p, r = _World.size, _World.rank
        self.shares = []
        try:
            for n, take in self._global_batches(rng):
                a, b = n * r // p, n * (r + 1) // p
                self.shares.append((n, a, b))
                self.optimizer._share = (b - a, n)
                for layer in self.offset_layers:
                    layer.sample_offset = a
                yield take(a, b)
        finally:
            self.optimizer._share = None
            for layer in self.offset_layers:
                layer.sample_offset = 0

    def gathered(self, targets, outputs):
        """The epoch's per-batch targets and outputs of every rank, in the global order
        (batch by batch, rank by rank): what one process would have seen. One pickled
        allgather per epoch."""
        if _World.size == 1:
            return targets, outputs
        host = [[np.asarray(backend.to_device(a, "cpu")) for a in part]
                for part in (targets, outputs)]
        everyone = _World.comm.allgather(host)
        xp = backend.get_array_module(outputs[0]) if outputs else np
        merged = ([], [])
        for j in range(len(targets)):
            for k in (0, 1):
                merged[k].extend(xp.asarray(parts[k][j]) for parts in everyone)
        return merged
