"""LeNet-5 trained on the GPU: the same model as mnist_lenet.py, moved with net.to("cuda").

The parameters and the optimizer state move to the GPU once; the data are
copied there once as CuPy arrays, so each training step runs the CUDA kernels
without host-device transfers. Needs CuPy and an NVIDIA GPU
(pip install 'fastnn[gpu]').

    python examples/gpu_lenet.py [--data DIR] [--epochs 15] [--kind fashion]
"""
import argparse
import sys
import time

import fastnn as fn
from fastnn import backend, datasets, metrics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", help="folder with the IDX files (default: $FASTNN_DATA)")
parser.add_argument("--kind", choices=("mnist", "fashion"), default="mnist")
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--limit", type=int, help="train on the first N images only (quick try)")
args = parser.parse_args()

if "cuda" not in backend.available():
    sys.exit("gpu_lenet.py: no usable CUDA device (needs CuPy and an NVIDIA GPU: "
             "pip install 'fastnn[gpu]'); run examples/mnist_lenet.py on the CPU instead")

(x_train, y_train), (x_test, y_test) = datasets.load_mnist(args.data, kind=args.kind)
if args.limit:
    x_train, y_train = x_train[:args.limit], y_train[:args.limit]

net = fn.Network([
    fn.Conv2D(1, 6, 5, padding=2, seed=1), fn.ReLU(), fn.MaxPool2D(2),
    fn.Conv2D(6, 16, 5, seed=2), fn.ReLU(), fn.MaxPool2D(2),
    fn.Flatten(),
    fn.Dense(16 * 5 * 5, 120, seed=3), fn.ReLU(),
    fn.Dense(120, 84, seed=4), fn.ReLU(),
    fn.Dense(84, 10, seed=5),
])
net.compile(loss="cross_entropy",
            optimizer=fn.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
            metrics=("accuracy",))
net.to("cuda")
print(f"network on {net.device}")

x_train, y_train = backend.to_device(x_train, "cuda"), backend.to_device(y_train, "cuda")
x_test, y_test = backend.to_device(x_test, "cuda"), backend.to_device(y_test, "cuda")

start = time.perf_counter()
net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, seed=0,
        callbacks=[fn.optim.CosineAnnealingLR(T_max=args.epochs)])
print(f"trained {args.epochs} epochs on the GPU in {time.perf_counter() - start:.1f}s")

scores = net.predict(x_test)            # a CuPy array; metrics copy it to the host
print(f"test accuracy {metrics.accuracy(y_test, scores):.4f}")
print(metrics.classification_report(y_test, scores))
