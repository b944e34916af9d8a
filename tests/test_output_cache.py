"""Kernel outputs and workspaces from the caching allocator (csrc/alloc.c, _output_array):
an output is a fresh array to its caller (nothing it or any view, slice, memoryview or
torch tensor of it holds ever changes); its block goes back to the cache only once all
of those are gone, and then serves the next call of its size; the cache stays under
its cap; no reference count is read (none of this depends on one)."""
import threading

import numpy as np
import pytest

from fastnn import backend, kernels
from _helpers import run_python

torch = pytest.importorskip("torch")


def _cpu():
    from fastnn.kernels import _cpu
    return _cpu


def on_cpu(fn, *args):
    previous = backend.current()
    backend.use("cpu")
    try:
        return fn(*args)
    finally:
        backend.use(previous)


def random(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _cached_cases():
    """Kernels whose outputs (64 KiB and more) come from _output_array: name, the call
    on one set of inputs, and a maker of inputs."""
    f32 = np.float32
    img = (64, 6, 28, 28)

    def conv(rng):
        return (random(rng, (8, 6, 28, 28)), random(rng, (5, 6, 5, 5)))

    def conv3(rng):                   # 3x3 stride 1, 8 channels in and out: Winograd
        return (random(rng, (8, 8, 30, 30)), random(rng, (8, 8, 3, 3)))

    return [
        ("relu_forward", kernels.relu_forward, lambda rng: (random(rng, img),)),
        ("relu_backward", kernels.relu_backward,
         lambda rng: (random(rng, img), random(rng, img))),
        ("dense_forward", kernels.dense_forward,
         lambda rng: (random(rng, (256, 300)), random(rng, (300, 200)), random(rng, (200,)))),
        ("dense_backward", kernels.dense_backward,
         lambda rng: (random(rng, (256, 200)), random(rng, (256, 300)),
                      random(rng, (300, 200)))),
        ("maxpool2d_forward", lambda x: kernels.maxpool2d_forward(x, 2, 2, 2),
         lambda rng: (random(rng, img),)),
        ("maxpool2d_backward", lambda g, a: kernels.maxpool2d_backward(g, a, img),
         lambda rng: (random(rng, (64, 6, 14, 14)),
                      rng.integers(0, 28 * 28, (64, 6, 14, 14)))),
        ("avgpool2d_forward", lambda x: kernels.avgpool2d_forward(x, 2, 2, 2),
         lambda rng: (random(rng, img),)),
        ("avgpool2d_backward", lambda g: kernels.avgpool2d_backward(g, img, 2, 2, 2),
         lambda rng: (random(rng, (64, 6, 14, 14)),)),
        ("leaky_relu_forward", kernels.leaky_relu_forward, lambda rng: (random(rng, img), 0.01)),
        ("leaky_relu_backward", kernels.leaky_relu_backward,
         lambda rng: (random(rng, img), random(rng, img))),
        ("dropout_forward", lambda x: _cpu().dropout_forward(x, 0.5, 3),
         lambda rng: (random(rng, img),)),
        ("dropout_backward", lambda g, m: _cpu().dropout_backward(g, m),
         lambda rng: (random(rng, img), random(rng, img))),
        ("batchnorm_forward", lambda x: _cpu().batchnorm_forward(
            x, np.ones(6, f32), np.zeros(6, f32), 1e-5), lambda rng: (random(rng, img),)),
        ("batchnorm_backward", lambda g, h: _cpu().batchnorm_backward(
            g, h, np.ones(6, f32), np.ones(6, f32)),
         lambda rng: (random(rng, img), random(rng, img))),
        ("softmax_cross_entropy", kernels.softmax_cross_entropy,
         lambda rng: (random(rng, (4096, 10)), rng.integers(0, 10, 4096))),
        ("conv2d_forward", lambda x, W: kernels.conv2d_forward(x, W, padding=2), conv),
        ("conv2d_backward", lambda x, W: kernels.conv2d_backward(
            np.ascontiguousarray(x[:, :5]), x, W, padding=2), conv),
        ("conv2d_forward_winograd", lambda x, W: kernels.conv2d_forward(x, W), conv3),
        ("conv2d_backward_winograd", lambda x, W: kernels.conv2d_backward(
            np.ascontiguousarray(x[:, :, 1:29, 1:29]), x, W), conv3),
        ("im2col", lambda x: kernels.im2col(x, 3, 3, padding=1),
         lambda rng: (random(rng, (4, 3, 30, 30), np.float64),)),
        ("col2im", lambda cols: kernels.col2im(cols, (4, 3, 30, 30), 3, 3, padding=1),
         lambda rng: (random(rng, (27, 3600), np.float64),)),
    ]


def _arrays(result):
    return [a for a in (result if isinstance(result, tuple) else (result,))
            if isinstance(a, np.ndarray)]


def _holders(a, want):
    """Ways a caller keeps an output ``a`` (of values ``want``) without the array itself:
    a view, a slice, a memoryview, a torch tensor; each with a reader of its values and
    the values it must keep."""
    return [(a.view(), np.asarray, want), (a.reshape(-1)[1:], np.asarray, want.reshape(-1)[1:]),
            (memoryview(a), np.asarray, want), (torch.from_numpy(a), lambda h: h.numpy(), want)]


CASES = _cached_cases()


@pytest.mark.parametrize("name, op, make", CASES, ids=[c[0] for c in CASES])
def test_kept_outputs_and_their_views_never_change(name, op, make):
    """Only views of an output kept (the array itself dropped): later calls of the same
    shapes write elsewhere; once the views are gone too, the blocks serve the next call."""
    cpu = _cpu()
    rng = np.random.default_rng(13)
    a, b = make(rng), make(rng)
    want_a = [x.copy() for x in _arrays(on_cpu(op, *a))]
    want_b = [x.copy() for x in _arrays(on_cpu(op, *b))]
    first = _arrays(on_cpu(op, *a))
    assert any(isinstance(x.base, cpu._Block) for x in first), "nothing from the cache"
    cached = {x.ctypes.data for x in first if isinstance(x.base, cpu._Block)}
    kept = [held for x, want in zip(first, want_a) for held in _holders(x, want)]
    del first                                      # (no loop variable keeps one)
    for _ in range(2):
        later = _arrays(on_cpu(op, *b))
        assert not ({x.ctypes.data for x in later} & cached)
        for got, want in zip(later, want_b):
            np.testing.assert_array_equal(got, want)
        del later
    for holder, read, want in kept:
        np.testing.assert_array_equal(read(holder), want)
    del kept, holder
    hits = cpu._cache_stats()["hits"]
    third = _arrays(on_cpu(op, *a))                # takes first's blocks back
    assert cached <= {x.ctypes.data for x in third}
    assert cpu._cache_stats()["hits"] >= hits + len(cached)
    for got, want in zip(third, want_a):
        np.testing.assert_array_equal(got, want)


def test_small_outputs_are_plain_arrays_and_large_ones_aligned():
    cpu = _cpu()
    small = cpu._output_array((100, 100), np.float32)      # 40 KB, below 64 KiB
    assert small.base is None and small.flags.c_contiguous and small.flags.writeable
    large = cpu._output_array((3, 5, 1111), np.float64)
    assert isinstance(large.base, cpu._Block)
    assert large.shape == (3, 5, 1111) and large.dtype == np.float64
    assert large.flags.c_contiguous and large.flags.writeable and large.flags.aligned
    assert large.ctypes.data % 64 == 0
    empty = cpu._output_array((0, 7), np.float32)
    assert empty.shape == (0, 7)


def test_cache_reuses_a_freed_block_and_stays_under_its_cap():
    cpu = _cpu()
    cpu._cache_clear()
    stats = cpu._cache_stats()
    cap, mib = stats["cap_bytes"], 1 << 20
    assert stats["held_bytes"] == 0 and stats["held_blocks"] == 0
    a = cpu._output_array((mib,), np.uint8)
    address = a.ctypes.data
    del a
    assert cpu._cache_stats()["held_bytes"] == mib
    b = cpu._output_array((mib // 4,), np.float32)         # the same size: that block
    assert b.ctypes.data == address and cpu._cache_stats()["hits"] == stats["hits"] + 1
    del b
    # 24 blocks of 8-9 MiB (never touched, so nothing is really paged in), freed at once
    blocks = [cpu._output_array((8 * mib + 4096 * k,), np.uint8) for k in range(24)]
    assert sum(x.nbytes for x in blocks) > cap
    newest = blocks[-1].ctypes.data
    for k in range(len(blocks)):                   # freed in order, the last one newest
        blocks[k] = None
    stats = cpu._cache_stats()
    assert 0 < stats["held_bytes"] <= cap
    again = cpu._output_array((8 * mib + 4096 * 23,), np.uint8)   # the newest is kept
    assert again.ctypes.data == newest
    huge = cpu._output_array((cap + 4096,), np.uint8)              # over the cap: released
    del huge
    assert cpu._cache_stats()["held_bytes"] <= cap
    cpu._cache_clear()
    assert cpu._cache_stats()["held_bytes"] == 0


def test_outputs_from_threads_never_share_memory():
    """Kernels running at once on several threads (the GIL released inside them) each
    get their own blocks: every result is right."""
    rng = np.random.default_rng(5)
    xs = [random(rng, (64, 6, 28, 28)) for _ in range(4)]
    wants = [np.maximum(x, 0) for x in xs]
    errors = []

    def work(k):
        for _ in range(30):
            y = on_cpu(kernels.relu_forward, xs[k])
            z = on_cpu(kernels.relu_forward, -xs[k])
            if not (np.array_equal(y, wants[k]) and np.array_equal(z, np.maximum(-xs[k], 0))):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_cache_works_in_a_forked_child():
    """A forked child takes the parent's free blocks and gives them back (its lock
    re-initialized after the fork: under the GIL no other thread can hold it at a
    fork, so this checks the child's use, not the handler)."""
    result = run_python("""
        import os
        import numpy as np
        from fastnn import kernels
        x = np.random.default_rng(0).standard_normal((64, 6, 28, 28)).astype(np.float32)
        kernels.relu_forward(x)                          # one block freed into the cache
        pid = os.fork()
        if pid == 0:
            from fastnn.kernels import _cpu
            hits = _cpu._cache_stats()["hits"]
            ok = all(np.array_equal(kernels.relu_forward(-x), np.maximum(-x, 0))
                     for _ in range(20))
            os._exit(0 if ok and _cpu._cache_stats()["hits"] >= hits + 20 else 3)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    """)
    assert result.returncode == 0, result.stderr + result.stdout
