# fastnn/kernels/cpu/runtime.pxi -- included by _cpu.pyx.
#
# What every op family shares: array data pointers, outputs and workspaces from the
# caching allocator (csrc/alloc.c), BLAS thread control (holding BLAS to one thread inside
# fastnn's own parallel regions, found with threadpoolctl) and the worker pool's
# knobs and test hooks (csrc/pool.c). Threading: this file runs nothing in
# parallel itself; it owns the state the three regimes share (the worker pool,
# the BLAS hold, OpenMP's thread count, threads()) so that state exists once.

# --- the CPU feature cap (FASTNN_CPU_FEATURES) --------------------------------------
#
# Read once, here, before gemm.pxi asks fnn_sgemm_supported(): "native" (the default)
# lets every run-time check answer what the CPU has; "avx2" answers no for AVX-512
# (the own GEMM, the AVX-512 row kernels, SGD and dropout loops); "portable" also for
# AVX2 + FMA (the direct conv). Emulates an older CPU on this one (tests of a wheel).
CPU_FEATURE_CAPS = {"native": FNN_CPU_AVX512, "avx2": FNN_CPU_AVX2,
                    "portable": FNN_CPU_PORTABLE}


cdef int _cap_cpu_features() except -1:
    """Set fnn_cpu_cap from FASTNN_CPU_FEATURES; ValueError for an unknown value."""
    global fnn_cpu_cap
    value = os.environ.get("FASTNN_CPU_FEATURES", "").strip().lower() or "native"
    if value not in CPU_FEATURE_CAPS:
        raise ValueError(f"fastnn.kernels._cpu: FASTNN_CPU_FEATURES must be one of "
                         f"{list(CPU_FEATURE_CAPS)}, got {value!r}")
    fnn_cpu_cap = CPU_FEATURE_CAPS[value]
    return 0


_cap_cpu_features()


def cpu_features():
    """The FASTNN_CPU_FEATURES cap in effect: "native", "avx2" or "portable"."""
    return [name for name, cap in CPU_FEATURE_CAPS.items() if cap == fnn_cpu_cap][0]


cdef inline void* _data(cnp.ndarray a):
    return cnp.PyArray_DATA(a)


# --- arguments the kernels refuse ----------------------------------------------------
#
# The layers call these wrappers directly, past fastnn.kernels' checks, so each still
# refuses (cheaply: flags and dimensions, no pass over data) any array that would make
# its kernel read or write out of bounds or misread memory: wrong dtype, byte order,
# layout or shape, or a read-only output.

cdef int _float_input(str who, str name, cnp.ndarray a, tuple shape=None) except -1:
    """The type (NPY_FLOAT or NPY_DOUBLE) of ``a``, checked by _need; else TypeError."""
    if a is None or (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT
                     and cnp.PyArray_TYPE(a) != cnp.NPY_DOUBLE):
        raise TypeError(f"{who}: {name} must be a float32 or float64 array, got "
                        f"{'None' if a is None else a.dtype}")
    _need(who, name, a, cnp.PyArray_TYPE(a), shape)
    return cnp.PyArray_TYPE(a)


cdef int _need(str who, str name, cnp.ndarray a, int typenum, tuple shape,
               bint write=False) except -1:
    """Refuse ``a`` unless it is an aligned C-contiguous array of ``typenum`` in native
    byte order, of ``shape`` (None: any; an entry None: any size), writeable when
    ``write``: TypeError for the dtype, ValueError for the rest."""
    cdef int k
    cdef cnp.npy_intp *dims
    if a is None or cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{who}: {name} must be a {cnp.PyArray_DescrFromType(typenum)} array "
                        f"in native byte order, got {'None' if a is None else a.dtype}")
    ok = cnp.PyArray_ISCARRAY_RO(a) and (cnp.PyArray_ISWRITEABLE(a) or not write)
    if ok and shape is not None:
        dims = cnp.PyArray_DIMS(a)
        ok = cnp.PyArray_NDIM(a) == len(shape)
        for k in range(len(shape) if ok else 0):
            if shape[k] is not None and dims[k] != shape[k]:
                ok = False
    if not ok:
        raise ValueError(f"{who}: {name} must be an aligned C-contiguous "
                         f"{'writeable ' if write else ''}array of shape "
                         f"{'any' if shape is None else shape}, got shape {(<object>a).shape} "
                         f"(C-contiguous: {a.flags.c_contiguous}, writeable: {a.flags.writeable})")
    return 0


# float32/float64: a body is written once over Cython's fused type ``floating``;
# where the dtype is known only at run time (a pool job's ``single``), the one
# dispatch names the specialization with one of these tags (their value is unused).
cdef float _F32 = 0
cdef double _F64 = 0


def _is_float32(a):
    return a.dtype == np.float32


# --- outputs and workspaces from the caching allocator (csrc/alloc.c) -----------------
#
# A large array freed and allocated again pays its page faults every time on this VM
# (its host reclaims the pages a process gives back): W5's max-pool backward (a 32 MiB
# input gradient) took 3-20 ms instead of ~2, LeNet-5's training step paid ~600 faults,
# about 0.6 of its 3.4 ms. So outputs from FNN_CACHE_MIN bytes and conv workspaces take
# their memory from fnn_cache_alloc, whose freed blocks are kept for the next request
# of their size. An output is a fresh array to its caller: its base is a _Block, which
# gives the memory back to the cache only when it is deallocated, that is once the
# array and every view, slice, memoryview or torch tensor of it are gone.

cdef class _Block:
    """Owner of one block of the caching allocator (the base object of an output, or a
    workspace held by a kernel): frees it into the cache when released or deallocated."""
    cdef void *ptr
    cdef size_t nbytes

    def __dealloc__(self):
        fnn_cache_free(self.ptr)

    cdef void release(self) noexcept:
        """Give the block back now (a workspace whose kernel is done)."""
        fnn_cache_free(self.ptr)
        self.ptr = NULL


cdef _Block _take_block(size_t nbytes):
    """A _Block of ``nbytes`` (64-byte aligned), else MemoryError."""
    cdef _Block block = _Block.__new__(_Block)
    block.ptr = fnn_cache_alloc(nbytes)
    if block.ptr == NULL:
        raise MemoryError(f"fastnn: cannot allocate {nbytes} bytes")
    block.nbytes = nbytes
    return block


_FLOAT32_DESCR = np.dtype(np.float32)


cpdef cnp.ndarray _output_array(tuple shape, dtype):
    """An uninitialized C-contiguous array of ``shape``: np.empty below FNN_CACHE_MIN
    bytes, else memory from the caching allocator, owned by a _Block (its base)."""
    cdef cnp.dtype descr = dtype if type(dtype) is type(_FLOAT32_DESCR) else np.dtype(dtype)
    cdef cnp.npy_intp dims[32]
    cdef int nd = len(shape), k
    cdef Py_ssize_t nbytes = descr.itemsize
    if nd > 32:
        raise ValueError(f"_output_array: at most 32 dimensions, got {nd}")
    for k in range(nd):
        dims[k] = shape[k]
        if dims[k] < 0:
            raise ValueError(f"_output_array: negative size in {shape}")
        if dims[k] and nbytes > PY_SSIZE_T_MAX // dims[k]:
            raise ValueError(f"_output_array: {shape} of {descr} exceeds the address space")
        nbytes *= dims[k]
    if nbytes < FNN_CACHE_MIN or not descr.isnative:     # no Python call: batch-1 latency
        return cnp.PyArray_EMPTY(nd, dims, descr.type_num, 0) if descr.isnative \
            else np.empty(shape, descr)
    cdef _Block block = _take_block(nbytes)
    cdef cnp.ndarray a = cnp.PyArray_SimpleNewFromData(nd, dims, descr.type_num, block.ptr)
    cnp.set_array_base(a, block)
    return a


def _cache_stats():
    """The caching allocator's counters: dict(hits, misses, held_bytes, held_blocks,
    cap_bytes, min_bytes) (for tests and measurements)."""
    cdef int64_t out[4]
    fnn_cache_stats(out)
    return dict(hits=out[0], misses=out[1], held_bytes=out[2], held_blocks=out[3],
                cap_bytes=FNN_CACHE_CAP, min_bytes=FNN_CACHE_MIN)


def _cache_clear():
    """Release every free block of the caching allocator (for tests)."""
    fnn_cache_clear()


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


def _pool_spin_us(Py_ssize_t us=-1):
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
    Py_ssize_t inner


cdef void _sum_task(void *ctx, Py_ssize_t i) noexcept nogil:
    (<int64_t*>ctx)[0] += i + 1       # unsynchronized: right only when run serially


cdef void _nest_task(void *ctx, Py_ssize_t i) noexcept nogil:
    cdef _nest_job *job = <_nest_job*>ctx
    cdef int64_t total = 0
    cdef int threads = fnn_pool_run(_sum_task, &total, job.inner)
    job.out[2 * i] = total
    job.out[2 * i + 1] = threads


def _pool_nested(Py_ssize_t outer, Py_ssize_t inner, bint in_openmp=False):
    """Tests of nested calls: ``outer`` tasks (a pool job, or an OpenMP loop when
    ``in_openmp``), each running a pool job of ``inner`` tasks that add i + 1 to one
    unsynchronized total. -> int64 (outer, 2): each nested job's total (inner *
    (inner + 1) / 2 when it ran serially) and the threads it reported."""
    cdef cnp.ndarray out = np.zeros((outer, 2), dtype=np.int64)
    cdef _nest_job job
    cdef Py_ssize_t t
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
    cdef Py_ssize_t posted, helped
    fnn_pool_stats(&posted, &helped)
    return posted, helped


def _assume_busy_cores():
    """Act as if contention had just been seen (for tests): the next split GEMMs and
    GEMVs run their blocks on the calling thread."""
    fnn_pool_set_busy(1)


def _forget_busy_cores():
    """Forget any contention seen (for tests): the next split GEMMs and GEMVs go to the
    pool's workers again."""
    fnn_pool_set_busy(0)
