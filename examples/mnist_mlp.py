"""A multilayer perceptron on MNIST: 784-256-128-10 with ReLU, about 98% test accuracy.

The images (N, 1, 28, 28) are flattened to 784 features; the last layer gives
logits and the cross-entropy loss applies the softmax. SGD with momentum, L2
weight decay and a cosine learning-rate schedule; 5000 training images are
held out to watch the validation accuracy.

    python examples/mnist_mlp.py [--data DIR] [--epochs 20] [--kind fashion]

DIR holds the four IDX files (or mnist/ and fashion-mnist/ folders); the
default is $FASTNN_DATA.
"""
import argparse
import time

import fastnn as fn
from fastnn import data, datasets, metrics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", help="folder with the IDX files (default: $FASTNN_DATA)")
parser.add_argument("--kind", choices=("mnist", "fashion"), default="mnist")
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--limit", type=int, help="train on the first N images only (quick try)")
parser.add_argument("--save", help="save the trained network to this .npz file")
args = parser.parse_args()

(x, y), (x_test, y_test) = datasets.load_mnist(args.data, kind=args.kind)
(x_train, y_train), (x_val, y_val), _ = data.train_val_test_split(x, y, val=5000 / 60000,
                                                                 test=0.0, seed=0)
if args.limit:
    x_train, y_train = x_train[:args.limit], y_train[:args.limit]

net = fn.Network([
    fn.Flatten(),
    fn.Dense(784, 256, seed=1), fn.ReLU(),
    fn.Dense(256, 128, seed=2), fn.ReLU(),
    fn.Dense(128, 10, seed=3),
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
print(metrics.classification_report(y_test, net.predict(x_test)))
if args.save:
    net.save(args.save)
