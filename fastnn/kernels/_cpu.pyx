# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled CPU kernels: Cython wrappers around ``csrc/`` (C99 + OpenMP) and BLAS.

Same functions and arguments as ``_reference`` (already validated and
C-contiguous, ``stride``/``padding`` as ``(h, w)`` pairs). Every kernel takes
float32 or float64 and releases the GIL while it runs.

GEMMs: float32 ones from 2 MFLOP run on fastnn's own AVX-512 kernel
(``csrc/sgemm.c``, one thread per call) where the CPU has AVX-512; the others
come from the BLAS behind ``scipy.linalg.cython_blas`` (OpenBLAS in the wheels).

Threading, and why. BLAS has a thread pool of its own; the rest runs on OpenMP
(element-wise kernels, Winograd blocks) or, for jobs of microseconds to a
millisecond (GEMM blocks, batch-1 GEMVs, conv samples, SGD blocks), on fastnn's
own worker pool
(``csrc/pool.c``: its idle workers spin for 100 us, yielding their core, so a
job starts on them within a microsecond, where waking libgomp's passive
workers costs tens). The pools never run at the same time (each one's idle
workers would starve the other's: DESIGN.md measured 38 against 377 GFLOP/s):

- dense: the own kernel's GEMMs from 2^23 flops in blocks of columns over the
  worker pool (one call per block, as below); BLAS GEMMs from 2^27 flops one per
  product, threaded by BLAS, outside any OpenMP region (its threads share the
  packed operands: 150 GFLOP/s here against 110-130 for the same GEMMs split
  into single-threaded blocks);
  from 2^23 to 2^27, blocks over the worker pool with BLAS held to one
  thread, taken dynamically, on the calling thread alone while the other
  cores are busy (``_gemm_split``: a threaded GEMM of a millisecond stalls
  whenever the scheduler keeps one of its threads waiting); below, one BLAS
  thread. One sample (a GEMV): BLAS held to one thread, and from 256 KB of
  weights blocks of inputs over the worker pool (``_split_gemv_run``);
- conv: the samples over the worker pool (forward; backward: fixed chunks of
  samples), one patch matrix + single-threaded GEMM per sample and thread (two
  threads reach about 2 x 75 GFLOP/s where BLAS's own threads reach about 115
  on one sample's GEMM; a LeNet layer takes 0.2-1 ms, where a passive OpenMP
  region costs 50-60 us to start on this KVM guest). BLAS is held to one
  thread for the duration of that job (``fnn_blas_single_begin/end``,
  through the thread-count functions of the library, found with
  threadpoolctl) and restored afterwards. If that control cannot be found,
  or the batch is smaller than the thread count, samples run one after the
  other with BLAS threading each GEMM. Float32 stride-1 convs with few output
  channels (at most 16, e.g. LeNet's) run a direct conv per sample (no GEMM,
  csrc/direct_conv.c) in the same loops. 3x3 stride-1 float32 convs run as
  Winograd F(2x2, 3x3) instead (csrc/winograd_template.h): OpenMP over blocks
  of tiles, 16 single-threaded GEMMs per block, the same BLAS hold.
- SGD: a parameter of 65536 elements or more in blocks over the worker pool;
- ReLU, max/average pooling and BatchNorm: ranges of about 2^16 elements
  (FNN_SPLIT_ELEMENTS) over the worker pool, one thread below; the other
  element-wise kernels (leaky ReLU, dropout, softmax): OpenMP from 2^21 elements
  (FNN_PARALLEL_MIN), one thread below.

``fastnn.backend`` makes libgomp's idle workers sleep instead of spin
(``OMP_WAIT_POLICY=passive`` while this module loads, unless the user chose a
policy), so they do not steal a core from NumPy's BLAS between fastnn calls.
"""
import math
import os

import numpy as np
cimport numpy as cnp
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython cimport floating
from cython.parallel cimport prange
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t, uint64_t
from libc.float cimport DBL_MIN, FLT_MIN
from libc.math cimport fabs, fabsf, sqrt, sqrtf
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

cnp.import_array()

# One extension module, so that the worker pool, the BLAS hold and the OpenMP state
# exist once; each op family lives in its own include file (each says what it holds
# and how it is threaded).
include "cpu/extern.pxi"
include "cpu/runtime.pxi"
include "cpu/gemm.pxi"
include "cpu/elementwise.pxi"
include "cpu/pooling.pxi"
include "cpu/norm.pxi"
include "cpu/augment.pxi"
include "cpu/optim.pxi"
include "cpu/conv.pxi"
include "cpu/variants.pxi"
