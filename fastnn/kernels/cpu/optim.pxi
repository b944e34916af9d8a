# fastnn/kernels/cpu/optim.pxi -- included by _cpu.pyx.
#
# Update rules on one parameter, in place and in one pass: sgd_step (PyTorch's SGD,
# momentum on AVX-512 lanes for float32) and adam_step (PyTorch's Adam).
# Threading: a parameter of SGD_SPLIT_MIN elements or more in blocks of SGD_BLOCK
# over the worker pool (element-wise: the same bits however they are run).
# Optimizer state (momentum buffers, Adam's m and v, RMSprop's square_avg) is stored
# flushed: an entry below the dtype's smallest normal number becomes 0 (_flushed).


cdef inline floating _flushed(floating v) noexcept nogil:
    """v, or 0 where |v| is below the dtype's smallest normal number (NaN stays NaN).
    A zero gradient decays a momentum buffer by `momentum` a step into subnormals
    (after ~800 SGD steps at 0.9), which cost a CPU ~20x per element (W2's 256x128
    momentum step went from 7 to 160 us with 22% of it subnormal)."""
    if floating is float:
        return 0 if fabsf(v) < FLT_MIN else v
    else:
        return 0 if fabs(v) < DBL_MIN else v

# --- SGD --------------------------------------------------------------------------

cdef void _sgd_step(floating *p, const floating *g, floating *buf, Py_ssize_t n, floating lr,
                    floating momentum, floating weight_decay, floating l1, bint nesterov,
                    bint first) noexcept nogil:
    cdef Py_ssize_t k
    cdef floating d, v
    if weight_decay == 0 and l1 == 0 and not nesterov:
        if buf == NULL:                  # plain SGD
            for k in range(n):
                p[k] = p[k] - lr * g[k]
            return
        if not first:                    # momentum, the common case: a branch-free loop
            if floating is float and _sgemm_supported and _avx_sgd:   # 16 lanes
                fnn_sgd_momentum_f(p, g, buf, n, lr, momentum)
                return
            for k in range(n):
                v = _flushed(momentum * buf[k] + g[k])
                buf[k] = v
                p[k] = p[k] - lr * v
            return
    for k in range(n):
        d = g[k]
        if weight_decay != 0:
            d = d + weight_decay * p[k]
        if l1 != 0:
            d = d + l1 * ((p[k] > 0) - (p[k] < 0))
        if buf != NULL:
            v = _flushed(d if first else momentum * buf[k] + d)
            buf[k] = v
            d = d + momentum * v if nesterov else v
        p[k] = p[k] - lr * d


# Variants (op "sgd_step", fastnn/kernels/variants.py): float32 momentum steps on the
# AVX-512 loop fnn_sgd_momentum_f where the CPU has it ("avx512", the default) or on
# the portable one: both give the same bits.
SGD_VARIANTS = {"avx512": 1, "portable": 2}
cdef bint _avx_sgd = True


# A parameter of this many elements or more is updated in blocks over the worker
# pool (element-wise, so the bits do not depend on the split): W2's 784x256
# weights, 3 streams of 0.8 MB, and its 256x128 ones, whose momentum buffer comes
# from memory (the step's other data pushed it out): 33 -> 22 us on two threads.
DEF SGD_SPLIT_MIN = 16384
DEF SGD_BLOCK = 16384


ctypedef struct _sgd_job:
    bint single, nesterov, first, has_buf
    void *p
    const void *g
    void *buf
    Py_ssize_t n, block
    double lr, momentum, weight_decay, l1


cdef inline void _sgd_block(const _sgd_job *job, Py_ssize_t block, floating kind) noexcept nogil:
    """Elements [block * job.block, ...) of an _sgd_job, the scalars rounded to the dtype."""
    cdef Py_ssize_t lo = block * job.block
    cdef Py_ssize_t count = min(job.block, job.n - lo)
    _sgd_step(<floating*>job.p + lo, <const floating*>job.g + lo,
              <floating*>job.buf + lo if job.has_buf else NULL, count, <floating>job.lr,
              <floating>job.momentum, <floating>job.weight_decay, <floating>job.l1,
              job.nesterov, job.first)


cdef void _sgd_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef const _sgd_job *job = <const _sgd_job*>ctx
    if job.single:
        _sgd_block(job, block, _F32)
    else:
        _sgd_block(job, block, _F64)


cdef void _sgd_job_init(_sgd_job *job, cnp.ndarray p, cnp.ndarray g, buf, double lr,
                        double momentum, double weight_decay, double l1, bint nesterov,
                        bint first):
    """sgd_step's job (``buf``: an array or None), for _sgd_run."""
    job.n = p.size
    job.p, job.g = _data(p), _data(g)
    job.has_buf = buf is not None
    job.buf = _data(<cnp.ndarray>buf) if job.has_buf else NULL
    job.single = _is_float32(p)
    job.lr, job.momentum, job.weight_decay, job.l1 = lr, momentum, weight_decay, l1
    job.nesterov, job.first = nesterov, first
    job.block = SGD_BLOCK if job.n >= SGD_SPLIT_MIN else max(job.n, 1)   # else one task


cdef inline void _sgd_run(_sgd_job *job) noexcept nogil:
    fnn_pool_run(_sgd_task, job, (job.n + job.block - 1) // job.block)


cdef int _update_arrays(str who, cnp.ndarray p, cnp.ndarray g, dict state) except -1:
    """Refuse an update the kernel could not run in bounds: p and ``state`` (name ->
    array) writeable, g and ``state`` of p's shape and dtype, all C-contiguous (_need)."""
    cdef int t = _float_input(who, "p", p)
    _need(who, "p", p, t, None, True)
    _need(who, "g", g, t, (<object>p).shape)
    for name, a in state.items():
        _need(who, name, a, t, (<object>p).shape, True)
    return 0


def sgd_step(cnp.ndarray p, cnp.ndarray g, cnp.ndarray buf, double lr, double momentum,
             double weight_decay, double l1, bint nesterov, bint first):
    """PyTorch's SGD rule on one parameter, in place and in one pass (dampening 0):
    d = g + weight_decay * p + l1 * sign(p); buf = d (``first``) or momentum * buf + d
    (``buf`` None: no momentum); d = d + momentum * buf (nesterov) or buf; p -= lr * d.
    p, g, buf: C-contiguous, same shape and dtype (float32 or float64). From
    SGD_SPLIT_MIN elements, blocks of SGD_BLOCK over the worker pool."""
    cdef _sgd_job job
    _update_arrays("sgd_step", p, g, {} if buf is None else {"buf": buf})
    _sgd_job_init(&job, p, g, buf, lr, momentum, weight_decay, l1, nesterov, first)
    with nogil:
        _sgd_run(&job)


# --- Adam ---------------------------------------------------------------------------

cdef void _adam_step(floating *p, const floating *g, floating *m, floating *v, Py_ssize_t n,
                     floating step_size, floating beta1, floating one_minus_beta1,
                     floating beta2, floating one_minus_beta2, floating inv_sqrt_bc2,
                     floating eps, floating weight_decay, floating decay_factor) noexcept nogil:
    """Adam on n elements, one pass, in adam_step's order of operations (AdamW's
    decoupled decay: p *= decay_factor first, skipped at 1)."""
    cdef Py_ssize_t k
    cdef floating d, mk, vk, root
    for k in range(n):
        if decay_factor != 1:
            p[k] = p[k] * decay_factor
        d = g[k]
        if weight_decay != 0:
            d = d + weight_decay * p[k]
        mk = _flushed(beta1 * m[k] + one_minus_beta1 * d)
        vk = _flushed(beta2 * v[k] + one_minus_beta2 * (d * d))
        m[k] = mk
        v[k] = vk
        root = sqrtf(vk) if floating is float else sqrt(vk)
        p[k] = p[k] - step_size * (mk / (root * inv_sqrt_bc2 + eps))


ctypedef struct _adam_job:
    bint single
    void *p
    const void *g
    void *m
    void *v
    Py_ssize_t n, block
    double step_size, beta1, beta2, inv_sqrt_bc2, eps, weight_decay, decay_factor


cdef inline void _adam_block(const _adam_job *job, Py_ssize_t block, floating kind) noexcept nogil:
    """Elements [block * job.block, ...) of an _adam_job; the scalars rounded to the
    dtype (1 - beta in double first, as NumPy does with a Python float)."""
    cdef Py_ssize_t lo = block * job.block
    cdef Py_ssize_t count = min(job.block, job.n - lo)
    _adam_step(<floating*>job.p + lo, <const floating*>job.g + lo, <floating*>job.m + lo,
               <floating*>job.v + lo, count, <floating>job.step_size, <floating>job.beta1,
               <floating>(1.0 - job.beta1), <floating>job.beta2, <floating>(1.0 - job.beta2),
               <floating>job.inv_sqrt_bc2, <floating>job.eps, <floating>job.weight_decay,
               <floating>job.decay_factor)


cdef void _adam_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef const _adam_job *job = <const _adam_job*>ctx
    if job.single:
        _adam_block(job, block, _F32)
    else:
        _adam_block(job, block, _F64)


def adam_step(cnp.ndarray p, cnp.ndarray g, cnp.ndarray m, cnp.ndarray v, double step_size,
              double beta1, double beta2, double inv_sqrt_bc2, double eps,
              double weight_decay, double decay_factor=1.0):
    """PyTorch's Adam rule on one parameter, in place (p, m, v) and in one pass:
    p = decay_factor * p (AdamW's decoupled decay; skipped at 1); g = g + weight_decay * p (when weight_decay != 0); m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * (g * g); p -= step_size * (m / (sqrt(v) *
    inv_sqrt_bc2 + eps)), in the parameter's dtype with the scalars rounded to it
    (step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t)). p, g, m, v:
    C-contiguous, one shape and dtype (float32 or float64). From SGD_SPLIT_MIN elements,
    blocks of SGD_BLOCK over the worker pool (element-wise: the same bits)."""
    cdef _adam_job job
    _update_arrays("adam_step", p, g, {"m": m, "v": v})
    job.n = p.size
    job.p, job.g, job.m, job.v = _data(p), _data(g), _data(m), _data(v)
    job.single = _is_float32(p)
    job.step_size, job.beta1, job.beta2 = step_size, beta1, beta2
    job.inv_sqrt_bc2, job.eps, job.weight_decay = inv_sqrt_bc2, eps, weight_decay
    job.decay_factor = decay_factor
    job.block = SGD_BLOCK if job.n >= SGD_SPLIT_MIN else max(job.n, 1)   # else one task
    with nogil:
        fnn_pool_run(_adam_task, &job, (job.n + job.block - 1) // job.block)


# --- RMSprop ------------------------------------------------------------------------

cdef void _rmsprop_step(floating *p, const floating *g, floating *sq, floating *buf,
                        Py_ssize_t n, floating lr, floating alpha, floating one_minus_alpha,
                        floating eps, floating momentum, floating weight_decay) noexcept nogil:
    """RMSprop on n elements, one pass, in rmsprop_step's order of operations."""
    cdef Py_ssize_t k
    cdef floating d, s, root
    for k in range(n):
        d = g[k]
        if weight_decay != 0:
            d = d + weight_decay * p[k]
        s = _flushed(alpha * sq[k] + one_minus_alpha * (d * d))
        sq[k] = s
        root = sqrtf(s) if floating is float else sqrt(s)
        d = d / (root + eps)
        if buf != NULL:
            d = _flushed(momentum * buf[k] + d)
            buf[k] = d
        p[k] = p[k] - lr * d


ctypedef struct _rmsprop_job:
    bint single, has_buf
    void *p
    const void *g
    void *sq
    void *buf
    Py_ssize_t n, block
    double lr, alpha, eps, momentum, weight_decay


cdef inline void _rmsprop_block(const _rmsprop_job *job, Py_ssize_t block,
                                floating kind) noexcept nogil:
    """Elements [block * job.block, ...) of an _rmsprop_job, the scalars rounded to the
    dtype (1 - alpha in double first, as NumPy does with a Python float)."""
    cdef Py_ssize_t lo = block * job.block
    cdef Py_ssize_t count = min(job.block, job.n - lo)
    _rmsprop_step(<floating*>job.p + lo, <const floating*>job.g + lo, <floating*>job.sq + lo,
                  <floating*>job.buf + lo if job.has_buf else NULL, count, <floating>job.lr,
                  <floating>job.alpha, <floating>(1.0 - job.alpha), <floating>job.eps,
                  <floating>job.momentum, <floating>job.weight_decay)


cdef void _rmsprop_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef const _rmsprop_job *job = <const _rmsprop_job*>ctx
    if job.single:
        _rmsprop_block(job, block, _F32)
    else:
        _rmsprop_block(job, block, _F64)


def rmsprop_step(cnp.ndarray p, cnp.ndarray g, cnp.ndarray square_avg, buf, double lr,
                 double alpha, double eps, double momentum, double weight_decay):
    """torch.optim.RMSprop's rule (centered=False) on one parameter, in place and in one
    pass: g = g + weight_decay * p; square_avg = alpha * square_avg + (1 - alpha) * g^2;
    d = g / (sqrt(square_avg) + eps); buf = momentum * buf + d, d = buf (``buf`` not
    None); p -= lr * d. p, g, square_avg, buf: C-contiguous, one shape and dtype (float32
    or float64). From SGD_SPLIT_MIN elements, blocks of SGD_BLOCK over the worker pool."""
    cdef _rmsprop_job job
    state = {"square_avg": square_avg}
    if buf is not None:
        state["buf"] = buf
    _update_arrays("rmsprop_step", p, g, state)
    job.n = p.size
    job.p, job.g, job.sq = _data(p), _data(g), _data(square_avg)
    job.has_buf = buf is not None
    job.buf = _data(<cnp.ndarray>buf) if job.has_buf else NULL
    job.single = _is_float32(p)
    job.lr, job.alpha, job.eps = lr, alpha, eps
    job.momentum, job.weight_decay = momentum, weight_decay
    job.block = SGD_BLOCK if job.n >= SGD_SPLIT_MIN else max(job.n, 1)   # else one task
    with nogil:
        fnn_pool_run(_rmsprop_task, &job, (job.n + job.block - 1) // job.block)
