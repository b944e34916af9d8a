# fastnn/kernels/cpu/runtime.pxi -- included by _cpu.pyx.
#
# What every op family shares: array data pointers, the output pool (large outputs
# from reused memory), BLAS thread control (holding BLAS to one thread inside
# fastnn's own parallel regions, found with threadpoolctl) and the worker pool's
# knobs and test hooks (csrc/pool.c). Threading: this file runs nothing in
# parallel itself; it owns the state the three regimes share (the worker pool,
# the BLAS hold, OpenMP's thread count, threads()) so that state exists once.

cdef inline void* _data(cnp.ndarray a):
    return cnp.PyArray_DATA(a)


# float32/float64: a body is written once over Cython's fused type ``floating``;
# where the dtype is known only at run time (a pool job's ``single``), the one
# dispatch names the specialization with one of these tags (their value is unused).
cdef float _F32 = 0
cdef double _F64 = 0


def _is_float32(a):
    return a.dtype == np.float32


# --- outputs from reused memory ------------------------------------------------------
#
# A kernel's output from OUTPUT_POOL_MIN bytes is a view of a buffer kept here, reused
# for a later output of the same size once nothing refers to it any more. Fresh memory
# faults in page by page, and on this VM (whose host reclaims the pages a process gives
# back) malloc hands back fresh pages all the time: 32 MiB or more is mapped anew on
# every call, and smaller blocks are trimmed off the heap's top when freed. W5's max-pool
# backward (its 32 MiB input gradient) took 3-20 ms instead of ~2; LeNet-5's training
# step (batch 64, activations of 0.1-1.2 MB) paid ~600 page faults, about 0.6 of its
# 3.4 ms. At most OUTPUT_POOL_BYTES stay held; free buffers of other sizes make room for
# a new one. Buffers sit in lists by size: a lookup reads only its own size's few.
DEF OUTPUT_POOL_MIN = 65536
DEF OUTPUT_POOL_BYTES = 134217728
cdef dict _output_pool = {}         # nbytes -> [uint8 buffers of that size]
cdef Py_ssize_t _output_pool_bytes = 0


cdef inline object _free_buffer(list buffers):
    """A buffer of ``buffers`` that only the pool refers to, or None."""
    cdef Py_ssize_t k
    cdef PyObject *held
    for k in range(len(buffers)):
        held = PyList_GET_ITEM(buffers, k)              # borrowed: the count stays the pool's
        if _Py_REFCNT(held) == 1:
            return <object>held
    return None


cdef void _output_pool_make_room(Py_ssize_t nbytes):
    """Drop free buffers (sizes in first-use order) until ``nbytes`` more fit."""
    global _output_pool_bytes
    cdef Py_ssize_t k
    for size in list(_output_pool):
        buffers = <list>_output_pool[size]
        k = 0
        while _output_pool_bytes + nbytes > OUTPUT_POOL_BYTES and k < len(buffers):
            if _Py_REFCNT(PyList_GET_ITEM(buffers, k)) == 1:
                del buffers[k]
                _output_pool_bytes -= size
            else:
                k += 1
        if not buffers:
            del _output_pool[size]
        if _output_pool_bytes + nbytes <= OUTPUT_POOL_BYTES:
            return


cpdef cnp.ndarray _output_array(tuple shape, dtype):
    """An uninitialized C-contiguous array, from the pool when large (see above)."""
    global _output_pool_bytes
    dtype = np.dtype(dtype)
    cdef Py_ssize_t nbytes = dtype.itemsize
    for d in shape:
        nbytes *= <Py_ssize_t>d
    if nbytes < OUTPUT_POOL_MIN:
        return np.empty(shape, dtype)
    buffers = _output_pool.get(nbytes)
    if buffers is not None:
        buffer = _free_buffer(<list>buffers)
        if buffer is not None:
            return buffer.view(dtype).reshape(shape)
    if _output_pool_bytes + nbytes > OUTPUT_POOL_BYTES:
        _output_pool_make_room(nbytes)
        if _output_pool_bytes + nbytes > OUTPUT_POOL_BYTES:
            return np.empty(shape, dtype)
        buffers = _output_pool.get(nbytes)
    buffer = np.empty(nbytes, np.uint8)
    if buffers is None:
        _output_pool[nbytes] = [buffer]
    else:
        (<list>buffers).append(buffer)
    _output_pool_bytes += nbytes
    return buffer.view(dtype).reshape(shape)


# --- BLAS held to one thread inside the per-sample conv regions --------------------

# (set, get) thread-count functions of the BLAS libraries scipy may be built with
_BLAS_THREAD_CONTROLS = [
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
]
cdef bint _blas_bound = False
cdef bint _blas_controlled = False


def _find_blas_thread_control():
    """Addresses of (set_num_threads, get_num_threads) of the BLAS behind
    scipy.linalg.cython_blas, or (None, None) when it cannot be told apart."""
    import ctypes
    import scipy
    try:
        from threadpoolctl import ThreadpoolController
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    except Exception:          # threadpoolctl missing or unable to inspect this process
        return None, None
    root = os.path.dirname(os.path.realpath(scipy.__file__))
    behind_scipy = [lib for lib in blas if os.path.realpath(lib.filepath).startswith(
        (root + os.sep, root + ".libs" + os.sep))]
    for lib in behind_scipy or (blas if len(blas) == 1 else []):
        library = ctypes.CDLL(lib.filepath)
        for set_name, get_name in _BLAS_THREAD_CONTROLS:
            setter = getattr(library, set_name, None)
            getter = getattr(library, get_name, None)
            if setter is not None and getter is not None:
                return (ctypes.cast(setter, ctypes.c_void_p).value,
                        ctypes.cast(getter, ctypes.c_void_p).value)
    return None, None


def blas_thread_control():
    """True when fastnn can hold BLAS to one thread (so the per-sample conv GEMMs can
    run inside its OpenMP team)."""
    global _blas_bound, _blas_controlled
    cdef size_t set_address, get_address
    if not _blas_bound:
        _blas_bound = True
        setter, getter = _find_blas_thread_control()
        if setter and getter:
            set_address, get_address = setter, getter
            fnn_blas_register(<fnn_set_threads_fn>set_address, <fnn_get_threads_fn>get_address)
            _blas_controlled = True
    return _blas_controlled


# OpenMP in a forked child: see csrc/forksafe.c. Installed before any kernel runs,
# so that a child forked after one (multiprocessing's default on Linux) runs its
# OpenMP regions on one thread instead of hanging in libgomp; Cython prange regions
# take num_threads=_omp_threads(...) for the same reason.
fnn_fork_guard_install()


cdef inline int _omp_threads(int wanted) noexcept nogil:
    """``wanted`` threads for an OpenMP region, 1 in a forked child."""
    return 1 if fnn_forked_child else wanted


def _in_forked_child():
    """True in a process forked from one that imported this module (for tests):
    its OpenMP regions run on one thread."""
    return bool(fnn_forked_child)


def threads():
    """OpenMP threads the kernels use (OMP_NUM_THREADS, else one per core)."""
    return fnn_max_threads()


def _pool_spin_us(long us=-1):
    """How long (us) an idle pool worker spins before it sleeps; set it when us >= 0
    (for measurements). Returns the old value."""
    old = fnn_pool_spin_us()
    if us >= 0:
        fnn_pool_set_spin_us(us)
    return old


def _pool_workers():
    """Worker threads the pool has started in this process (for tests)."""
    return fnn_pool_workers()


ctypedef struct _nest_job:            # _pool_nested: results of the nested jobs
    int64_t *out
    long inner


cdef void _sum_task(void *ctx, long i) noexcept nogil:
    (<int64_t*>ctx)[0] += i + 1       # unsynchronized: right only when run serially


cdef void _nest_task(void *ctx, long i) noexcept nogil:
    cdef _nest_job *job = <_nest_job*>ctx
    cdef int64_t total = 0
    cdef int threads = fnn_pool_run(_sum_task, &total, job.inner)
    job.out[2 * i] = total
    job.out[2 * i + 1] = threads


def _pool_nested(long outer, long inner, bint in_openmp=False):
    """Tests of nested calls: ``outer`` tasks (a pool job, or an OpenMP loop when
    ``in_openmp``), each running a pool job of ``inner`` tasks that add i + 1 to one
    unsynchronized total. -> int64 (outer, 2): each nested job's total (inner *
    (inner + 1) / 2 when it ran serially) and the threads it reported."""
    cdef cnp.ndarray out = np.zeros((outer, 2), dtype=np.int64)
    cdef _nest_job job
    cdef long t
    job.out, job.inner = <int64_t*>_data(out), inner
    with nogil:
        if in_openmp:
            for t in prange(outer, num_threads=_omp_threads(max(2, fnn_max_threads())),
                           schedule="static"):
                _nest_task(&job, t)
        else:
            fnn_pool_run(_nest_task, &job, outer)
    return out


def _pool_stats():
    """(jobs posted to the pool's workers, jobs in which a worker ran a task) so far in
    this process (for measurements)."""
    cdef long posted, helped
    fnn_pool_stats(&posted, &helped)
    return posted, helped


def _assume_busy_cores():
    """Act as if contention had just been seen (for tests): the next split GEMMs and
    GEMVs run their blocks on the calling thread."""
    fnn_pool_set_busy(1)
