"""A small BatchNorm CNN that reaches 99.5% on MNIST in about a minute on 2 CPU cores,
and 93% on Fashion-MNIST in two and a half (benchmarks/RESULTS.md): the learning-target
recipe, the same as ``fastnn-train mnist-cnn``, written with the public API only.

    augmentation (training only): random shifts of up to 2 pixels (Fashion-MNIST:
                                  1 pixel, and mirror images)
    conv 12@5x5 (padding 2) -> maxpool 2 -> BatchNorm -> ReLU      (12, 14, 14)
    conv 24@5x5             -> maxpool 2 -> BatchNorm -> ReLU      (24, 5, 5)
    flatten -> dense 128 -> BatchNorm -> ReLU -> dense 10 (logits)
    (Fashion-MNIST: 24@5x5, 48@3x3 and 96@3x3 stages)

Nesterov SGD with a one-cycle learning-rate schedule (a warm-up to the peak rate, 0.2
for MNIST and 0.1 for Fashion-MNIST, over the first quarter of the batches, then a
cosine down), batch 128, L2 weight decay 5e-4. The widths, epochs and learning rates
were chosen on the 5000 validation images, never on the test set.

    python examples/mnist_cnn.py [--data DIR] [--kind fashion] [--epochs N] [--seed S]
"""
import argparse
import time

import numpy as np

import fastnn as fn
from fastnn import data, datasets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", help="folder with the IDX files (default: $FASTNN_DATA)")
parser.add_argument("--kind", choices=("mnist", "fashion"), default="mnist")
parser.add_argument("--epochs", type=int, help="default: 15 (MNIST), 13 (Fashion-MNIST)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--limit", type=int, help="train on the first N images only (quick try)")
args = parser.parse_args()
epochs = args.epochs or (13 if args.kind == "fashion" else 15)

(x, y), (x_test, y_test) = datasets.load_mnist(args.data, kind=args.kind)
(x_train, y_train), (x_val, y_val), _ = data.train_val_test_split(x, y, val=5000 / 60000,
                                                                 test=0.0, seed=args.seed)
if args.limit:
    x_train, y_train = x_train[:args.limit], y_train[:args.limit]


def network(kind, seed):
    """The recipe's network: (N, 1, 28, 28) images -> (N, 10) logits. Pooling comes
    before BatchNorm (it normalises a quarter of the values), and the layers that
    BatchNorm follows have no bias (its shift replaces it)."""
    seeds = iter(np.random.default_rng(seed).integers(0, 2**31 - 1, size=8).tolist())
    shift = 1 if kind == "fashion" else 2      # Fashion-MNIST's clothes are centred
    layers = [fn.RandomTranslation(shift, shift, seed=next(seeds))]
    if kind == "mnist":
        return fn.Network(layers + [
            fn.Conv2D(1, 12, 5, padding=2, bias=False, seed=next(seeds)), fn.MaxPool2D(2),
            fn.BatchNorm2d(12), fn.ReLU(),                                    # (12, 14, 14)
            fn.Conv2D(12, 24, 5, bias=False, seed=next(seeds)), fn.MaxPool2D(2),
            fn.BatchNorm2d(24), fn.ReLU(),                                    # (24, 5, 5)
            fn.Flatten(),
            fn.Dense(24 * 5 * 5, 128, bias=False, seed=next(seeds)), fn.BatchNorm1d(128),
            fn.ReLU(),
            fn.Dense(128, 10, seed=next(seeds)),
        ])
    # Fashion-MNIST: mirror images too (a mirrored shirt is a shirt), a third stage and
    # twice the channels
    layers.append(fn.RandomFlip("horizontal", seed=next(seeds)))
    return fn.Network(layers + [
        fn.Conv2D(1, 24, 5, padding=2, bias=False, seed=next(seeds)), fn.MaxPool2D(2),
        fn.BatchNorm2d(24), fn.ReLU(),                                        # (24, 14, 14)
        fn.Conv2D(24, 48, 3, padding=1, bias=False, seed=next(seeds)), fn.MaxPool2D(2),
        fn.BatchNorm2d(48), fn.ReLU(),                                        # (48, 7, 7)
        fn.Conv2D(48, 96, 3, padding=1, bias=False, seed=next(seeds)), fn.MaxPool2D(2),
        fn.BatchNorm2d(96), fn.ReLU(),                                        # (96, 3, 3)
        fn.Flatten(),
        fn.Dense(96 * 3 * 3, 128, bias=False, seed=next(seeds)), fn.BatchNorm1d(128),
        fn.ReLU(),
        fn.Dense(128, 10, seed=next(seeds)),
    ])


net = network(args.kind, seed=args.seed)
batch_size, max_lr = 128, (0.1 if args.kind == "fashion" else 0.2)
net.compile(loss="cross_entropy", metrics=("accuracy",),
            optimizer=fn.optim.SGD(lr=max_lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
print(net.summary())
steps_per_epoch = -(-len(x_train) // batch_size)
schedule = fn.optim.OneCycleLR(max_lr, epochs, steps_per_epoch, pct_start=0.25)  # per batch

start = time.perf_counter()
net.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, validation_data=(x_val, y_val),
        callbacks=[schedule], seed=args.seed)
print(f"trained {epochs} epochs in {time.perf_counter() - start:.1f}s")
result = net.evaluate(x_test, y_test)
print(f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}")
