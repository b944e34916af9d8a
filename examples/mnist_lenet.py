"""LeNet-5 on MNIST (about 99% test accuracy) or Fashion-MNIST (about 90%).

Two rounds of convolution + ReLU + max-pooling extract local patterns from the
(N, 1, 28, 28) images, then three dense layers classify them:

    conv 6@5x5 (padding 2) -> ReLU -> maxpool 2     (6, 14, 14)
    conv 16@5x5            -> ReLU -> maxpool 2     (16, 5, 5)
    flatten -> dense 120 -> ReLU -> dense 84 -> ReLU -> dense 10 (logits)

    python examples/mnist_lenet.py [--data DIR] [--epochs 15] [--kind fashion]
"""
import argparse
import time

import fastnn as fn
from fastnn import data, datasets, metrics
from fastnn.train import FASHION_CLASSES

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", help="folder with the IDX files (default: $FASTNN_DATA)")
parser.add_argument("--kind", choices=("mnist", "fashion"), default="mnist")
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--limit", type=int, help="train on the first N images only (quick try)")
parser.add_argument("--save", help="save the trained network to this .npz file")
args = parser.parse_args()

(x, y), (x_test, y_test) = datasets.load_mnist(args.data, kind=args.kind)
(x_train, y_train), (x_val, y_val), _ = data.train_val_test_split(x, y, val=5000 / 60000,
                                                                 test=0.0, seed=0)
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
print(net.summary())

start = time.perf_counter()
history = net.fit(x_train, y_train, epochs=args.epochs, batch_size=64,
                  validation_data=(x_val, y_val), seed=0,
                  callbacks=[fn.optim.CosineAnnealingLR(T_max=args.epochs)])
print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f}s")

result = net.evaluate(x_test, y_test)
print(f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}")
names = FASHION_CLASSES if args.kind == "fashion" else None
print(metrics.classification_report(y_test, net.predict(x_test), target_names=names))
if args.save:
    net.save(args.save)
