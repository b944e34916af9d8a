"""The course's Circle experiment: two concentric classes no straight line separates.

A 2-16-2 tanh network on 1000 noisy points, split into train / dev (validation)
/ test sets; training stops early once the dev loss stops improving (and keeps
the best weights), then the test set gives the final score.

    python examples/circles.py [--epochs 100] [--plot circles.png]
"""
import argparse

import fastnn as fn
from fastnn import data, datasets, metrics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--plot", metavar="PNG", help="save curves and the decision boundary")
args = parser.parse_args()

x, y = datasets.circles(n=1000, noise=0.1, factor=0.5, seed=args.seed)
(x_train, y_train), (x_dev, y_dev), (x_test, y_test) = data.train_val_test_split(
    x, y, val=0.1, test=0.2, seed=args.seed)

net = fn.Network([
    fn.Dense(2, 16, init="xavier", seed=args.seed), fn.Tanh(),
    fn.Dense(16, 2, init="xavier", seed=args.seed + 1),      # logits of the two classes
])
net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.1, momentum=0.9),
            metrics=("accuracy",))
print(net.summary())

history = net.fit(x_train, y_train, epochs=args.epochs, batch_size=32,
                  validation_data=(x_dev, y_dev), seed=args.seed, verbose=0,
                  callbacks=[fn.callbacks.EarlyStopping(monitor="val_loss", patience=15)])
last = {key: values[-1] for key, values in history.history.items()}
print(f"{len(history.history['loss'])} epochs: train loss {last['loss']:.4f}, "
      f"dev loss {last['val_loss']:.4f}, dev accuracy {last['val_accuracy']:.4f}")

scores = net.predict(x_test)
print(f"test accuracy: {metrics.accuracy(y_test, scores):.4f}")
print(metrics.classification_report(y_test, scores, target_names=["outer", "inner"]))

if args.plot:
    from fastnn.train import plot   # needs matplotlib (pip install 'fastnn[plot]')
    plot(args.plot, history, "circles", net=net, points=(x_test, y_test))
    print(f"wrote {args.plot}")
