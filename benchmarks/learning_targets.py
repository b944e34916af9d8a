"""The learning targets of benchmarks/RESULTS.md: the mnist-cnn recipe of ``fastnn-train``
on MNIST (>= 99.5% test accuracy in <= 60 s of training) and Fashion-MNIST (>= 93% in
<= 150 s), on 2 CPU threads, over seeds -- and PyTorch with the same recipe, next to it.

    python benchmarks/learning_targets.py [--kind mnist fashion] [--seeds 0 1 2]
        [--framework fastnn torch] [--data DIR] [--epochs N] [--limit N] [--json FILE]

The same recipe on both sides: the same 55000/5000 training/validation split
(``fastnn.train.load_task_data``), the same layers, widths and augmentation
(``train.CNN_RECIPES``), He initialisation, random shifts (up to 2 pixels for MNIST, 1
for Fashion-MNIST, which also flips horizontally) drawn per sample, Nesterov SGD
(momentum 0.9, weight decay on the conv/dense weights only), a one-cycle schedule
stepping per batch (pct_start 0.25), batch 128, the validation set evaluated after
every epoch. Seconds are the training loop's wall time
(validation included, data loading excluded); accuracy is on the 10000 test images.
"""
import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import time


from fastnn import train

TARGETS = {"mnist": (0.995, 60.0), "fashion": (0.93, 150.0)}   # (test accuracy, seconds)


def recipe_args(kind, seed, args):
    """fastnn-train's arguments of one mnist-cnn run: the recipe's defaults for ``kind``,
    with this script's --data, --epochs and --limit."""
    argv = ["mnist-cnn", "--kind", kind, "--seed", str(seed), "--data", args.data]
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += ["--limit", str(args.limit)] if args.limit else []
    return train.parse_args(argv)


def fastnn_run(kind, seed, args):
    """(seconds, final validation accuracy, test accuracy, epochs) of fastnn-train mnist-cnn."""
    run_args = recipe_args(kind, seed, args)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _, history, test_accuracy = train.run(run_args)
    seconds = float(re.search(r"training took ([0-9.]+)s", out.getvalue()).group(1))
    return seconds, history.history["val_accuracy"][-1], test_accuracy, run_args.epochs


def torch_model(torch, kind):
    """The recipe's network (``train.CNN_RECIPES[kind]``) in PyTorch, initialised as
    fastnn's "he" (normal, std sqrt(2 / fan_in)), biases zero."""
    nn = torch.nn
    stages, hidden = train.CNN_RECIPES[kind]["stages"], train.CNN_RECIPES[kind]["hidden"]
    layers, channels, side = [], 1, 28
    for out, kernel, padding in stages:
        layers += [nn.Conv2d(channels, out, kernel, padding=padding, bias=False),
                   nn.MaxPool2d(2), nn.BatchNorm2d(out), nn.ReLU()]
        channels, side = out, (side + 2 * padding - kernel + 1) // 2
    model = nn.Sequential(*layers, nn.Flatten(),
                          nn.Linear(channels * side * side, hidden, bias=False),
                          nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def torch_augment(torch, x, flip, gen, shift):
    """(N, C, H, W) -> each sample shifted by whole pixels in [-shift, shift] per axis
    (zeros filled) and, with ``flip``, mirrored left-right with probability 1/2."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift)).permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * shift + 1, (n, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n, 1, 1), generator=gen)
    rows = torch.arange(h).view(1, h, 1) + dy
    cols = torch.arange(w).view(1, 1, w) + dx
    if flip:
        mirrored = torch.rand(n, 1, 1, generator=gen) < 0.5
        cols = torch.where(mirrored, cols.flip(-1), cols)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2).contiguous()


def torch_run(kind, seed, args):
    """The same recipe in PyTorch: (seconds, final validation accuracy, test accuracy, epochs)."""
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    run_args = recipe_args(kind, seed, args)
    (x, y), (xv, yv), (xt, yt) = [(torch.from_numpy(a), torch.from_numpy(b))
                                  for a, b in train.load_task_data("mnist-cnn", run_args)]
    model = torch_model(torch, kind)
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": run_args.weight_decay},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=run_args.lr, momentum=0.9, nesterov=True)
    batch, epochs = run_args.batch_size, run_args.epochs
    steps = -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, run_args.lr, epochs=epochs,
                                                   steps_per_epoch=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    accuracy = lambda xs, ys: (model(xs).argmax(1) == ys).double().mean().item()  # noqa: E731
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            xb = torch_augment(torch, x[idx], train.CNN_RECIPES[kind]["flip"], gen,
                               train.CNN_RECIPES[kind]["shift"])
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss.item()                 # read back every batch, as fastnn's fit does
        model.eval()
        with torch.no_grad():
            val_accuracy = accuracy(xv, yv)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return seconds, val_accuracy, accuracy(xt, yt), epochs


def summary_rows(results):
    """Markdown rows: per framework and data set, each seed and the medians."""
    rows = ["| framework | data | epochs | seconds (per seed) | val accuracy | test accuracy "
            "(per seed) | median test | target |", "|---|---|---|---|---|---|---|---|"]
    for (framework, kind), runs in results.items():
        accuracy, seconds = TARGETS[kind]
        test = [r["test"] for r in runs]
        rows.append(
            f"| {framework} | {kind} | {runs[0]['epochs']} | "
            + ", ".join(f"{r['seconds']:.1f}" for r in runs)
            + f" (median {statistics.median(r['seconds'] for r in runs):.1f}) | "
            + ", ".join(f"{100 * r['val']:.2f}" for r in runs) + " | "
            + ", ".join(f"{100 * t:.2f}" for t in test)
            + f" | {100 * statistics.median(test):.2f}% | >= {100 * accuracy:.1f}% "
              f"in <= {seconds:.0f} s |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", nargs="+", choices=("mnist", "fashion"), default=["mnist", "fashion"])
    p.add_argument("--framework", nargs="+", choices=("fastnn", "torch"),
                   default=["fastnn", "torch"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", default=os.environ.get("FASTNN_DATA"),
                   help="folder holding mnist/ and fashion-mnist/ (default: $FASTNN_DATA)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (quick checks)")
    p.add_argument("--limit", type=int, help="first N images only (quick checks)")
    p.add_argument("--json", help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    runners = {"fastnn": fastnn_run, "torch": torch_run}
    results = {}
    for kind in args.kind:
        for seed in args.seeds:
            for framework in args.framework:
                seconds, val, test, epochs = runners[framework](kind, seed, args)
                record = dict(framework=framework, kind=kind, seed=seed, epochs=epochs,
                              seconds=round(seconds, 2), val=val, test=test,
                              load=os.getloadavg()[0])
                print(json.dumps(record), flush=True)
                results.setdefault((framework, kind), []).append(record)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(record) + "\n")
    print("\n".join(summary_rows(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
