"""Case lists of the kernel tests, one home for every backend: tests/test_kernels.py runs
them on the NumPy reference, the compiled CPU kernels and, where a GPU is usable, the
CUDA kernels (tests/test_cuda.py keeps only GPU-only tests). A case added here runs on
every backend."""

# (N, C, H, W, K, kh, kw, stride, padding): odd sizes, strides and paddings,
# batch of 1, a 1x1 conv, a kernel as large as the padded input.
CONV_CASES = [
    (2, 3, 7, 9, 4, 3, 3, 1, 1),
    (1, 2, 8, 5, 3, 3, 2, (2, 1), (0, 1)),
    (3, 4, 6, 6, 2, 1, 1, 1, 0),
    (2, 1, 5, 5, 2, 5, 5, 1, 2),
    (2, 3, 9, 8, 4, 3, 3, 2, 0),
    (1, 2, 4, 3, 3, 6, 5, 3, 1),
    (2, 2, 7, 7, 3, 2, 4, (3, 2), (2, 0)),
    (1, 16, 20, 19, 32, 3, 3, 1, 1),     # batch of 1: BLAS threads the GEMMs, not OpenMP
    (3, 8, 12, 12, 24, 3, 3, 1, 1),      # more samples than threads, GEMMs per sample
    (2, 3, 5, 4, 2, 2, 2, 1, 2),         # stride 1 but padding >= kernel: the col2im path
    (3, 2, 6, 5, 3, 3, 1, 1, (1, 0)),    # stride 1, non-square kernel and padding
    (3, 5, 9, 8, 4, 3, 3, 2, 1),         # patch rows forward, columns backward (stride 2)
    (2, 6, 7, 9, 5, 3, 3, 1, 1),         # y.T (63, 5): a transpose with ragged edges in both
                                         # dimensions around the 4x4 blocks
    (2, 9, 3, 3, 10, 3, 3, 1, 0),        # one output pixel, more filters than pixels
    (2, 33, 7, 9, 5, 3, 3, 1, 1),        # grad_x by the transposed conv: grad_x.T (63, 33) ragged
    # float32 stride 1, K <= 16, rows of >= 8 pixels: the direct conv forward (blocks of
    # 4, 6 or 8 channels, 8 pixels, a ragged row end overlapping); LeNet's convs at
    # batch 1 and 64, odd sizes
    (1, 1, 28, 28, 6, 5, 5, 1, 2),
    (64, 1, 28, 28, 6, 5, 5, 1, 2),
    (64, 6, 14, 14, 16, 5, 5, 1, 0),
    (2, 1, 13, 11, 6, 5, 5, 1, 2),
    (2, 6, 15, 13, 16, 5, 5, 1, 0),
    (2, 2, 9, 17, 5, 5, 5, 1, 2),
    (2, 3, 8, 12, 11, 3, 5, 1, (0, 2)),
    (2, 3, 9, 10, 8, 3, 3, 1, 1),        # 8 and 16 channels: 6-pixel blocks, channels in lanes
    (1, 2, 6, 8, 3, 1, 1, 1, 0),         # but 1x1 keeps its GEMM on x
    (2, 5, 7, 9, 3, 3, 5, 1, (2, 1)),    # patch rows, grad_x by col2im on padded rows
    (3, 6, 14, 14, 16, 5, 5, 1, 0),      # LeNet's second conv: grad_W on rows, grad_x by col2im
    (2, 12, 14, 14, 24, 5, 5, 1, 0),     # MNIST's 12 -> 24: the implicit conv's 32-lane tiles
    (2, 5, 9, 8, 40, 5, 3, 1, (2, 1)),   # implicit: 32 + 16 lanes, a ragged last pixel tile
    (3, 13, 9, 7, 10, 5, 3, 1, (2, 1)),  # implicit grad_x summed tap by tap: 13 of 16 lanes,
                                         # padding, a ragged pixel tile
    (2, 20, 6, 5, 7, 3, 3, 1, 0),        # the same on 32 lanes (20 used), 12 pixels
    # from the CUDA tests: 3 filters, batch 1, rectangular windows, odd sizes
    (1, 1, 5, 5, 3, 3, 3, 1, 0),
    (2, 3, 7, 6, 3, 3, 3, 1, 1),
    (3, 2, 9, 11, 3, 2, 3, 2, 0),
    (2, 4, 8, 7, 3, 3, 2, (2, 1), (1, 2)),
    (1, 3, 6, 6, 3, 1, 1, 1, 0),
    (4, 2, 10, 9, 3, 5, 4, 3, 2),
    (5, 1, 28, 28, 3, 5, 5, 1, 2),
]
CONV_IDS = [f"case{i}" for i in range(len(CONV_CASES))]
LENET_CONV2 = CONV_CASES[25]      # (3, 6, 14, 14, 16, 5, 5, 1, 0), picked by some tests


GEOMETRIES = [  # (N, C, H, W, kh, kw, stride, padding)
    (2, 3, 5, 6, 3, 3, 1, 1),
    (1, 2, 7, 4, 2, 3, (2, 1), (1, 0)),
    (3, 1, 6, 6, 3, 3, 2, 2),
    (2, 2, 3, 3, 5, 5, 1, 1),
    # the CUDA tests' conv geometries
    (1, 1, 5, 5, 3, 3, 1, 0),
    (2, 3, 7, 6, 3, 3, 1, 1),
    (3, 2, 9, 11, 2, 3, 2, 0),
    (2, 4, 8, 7, 3, 2, (2, 1), (1, 2)),
    (1, 3, 6, 6, 1, 1, 1, 0),
    (4, 2, 10, 9, 5, 4, 3, 2),
    (5, 1, 28, 28, 5, 5, 1, 2),
]


POOL_CASES = [  # (N, C, H, W, kh, kw, stride): odd sizes, overlapping windows, batch of 1
    (2, 3, 8, 8, 2, 2, 2),
    (1, 2, 7, 9, 2, 2, 2),       # odd sizes: the last row and column belong to no window
    (1, 2, 7, 9, 3, 3, 2),
    (2, 2, 5, 6, 2, 3, (1, 2)),
    (3, 1, 9, 7, 3, 2, (3, 1)),
    # 2x2/2 rows of at least 4 outputs run 4 at a time (SSE, float32), a ragged end as
    # one more overlapping block: LeNet's 28x28 and 10x10, and odd widths
    (2, 3, 28, 28, 2, 2, 2),
    (1, 2, 10, 10, 2, 2, 2),
    (1, 1, 5, 23, 2, 2, 2),
    (1, 1, 3, 17, 2, 2, 2),
    # rows of 1 to 3 outputs (float32: each copied into a block of 4 first)
    (2, 3, 7, 7, 2, 2, 2),
    (1, 2, 2, 3, 2, 2, 2),
    (1, 1, 5, 4, 2, 2, 2),
    (3, 1, 5, 5, 2, 3, (1, 2)),  # from the CUDA tests: rectangular windows, strides
    (1, 1, 4, 6, 4, 6, 1),       # one window covering the plane
    # outputs half the input's size: the backward's 2x2 cells tile the plane, but a
    # 3x3/1 window's maximum may lie outside its output's cell (the scatter then)
    (2, 3, 4, 4, 3, 3, 1),
    (1, 2, 8, 6, 1, 1, 2),       # 1x1/2: each maximum in its cell's top-left corner
]


AVGPOOL_CASES = POOL_CASES + [
    (1, 2, 6, 7, 2, 2, 1),       # overlapping 2x2 windows: each pixel in up to four
    (2, 1, 3, 3, 3, 3, 1),       # one window covering the whole plane
]


# (N, C, H, W): global average pooling; a 1x1 plane, batch 1, an empty batch, a large plane
# (N, C, H, W) images for the augmentation copies: odd sizes, batch 1, 1x1 and 1-wide
# images, an empty batch, a MNIST-sized batch
AUGMENT_CASES = [(3, 2, 5, 7), (1, 1, 4, 4), (4, 3, 1, 1), (2, 1, 1, 9), (0, 3, 4, 4),
                 (5, 1, 28, 28), (2, 3, 8, 3)]
GLOBAL_POOL_CASES = [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 28, 28), (0, 3, 4, 4), (2, 1, 64, 65)]


# (N, I, O): the compiled GEMM paths' sizes, batch 1, one input feature, an empty batch
DENSE_CASES = [(37, 50, 23), (150, 200, 70), (20, 300, 500),
               (1, 5, 3), (7, 13, 4), (33, 1, 65), (0, 6, 5)]


# (N, C): batch 1, more rows than a warp, more classes than a warp, few classes
SOFTMAX_CASES = [(65, 33), (1, 10), (37, 10), (5, 45), (300, 3)]


BATCHNORM_SHAPES = [(2, 3), (64, 257), (5, 4, 3), (1, 3, 7, 5), (16, 6, 28, 28),
                    (8, 32, 96, 96),      # channels split over the CPU threads
                    (130, 12, 7, 9),      # ranges of channels and samples with a ragged end
                    (7, 5), (1, 3), (4, 3, 5, 6), (2, 6, 1, 9)]    # from the CUDA tests
