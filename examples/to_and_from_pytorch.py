"""Move weights between fastnn and PyTorch, and run a fastnn network in ONNX Runtime.

1. Train a small MLP and a small CNN with BatchNorm in fastnn (synthetic data, a few
   seconds), load their ``state_dict()`` into the same layers as a ``torch.nn.Sequential``:
   both predict the same.
2. The other way round: a PyTorch model's weights into fastnn.
3. Export the fastnn CNN to ONNX and run it in ONNX Runtime.

    pip install torch onnx onnxruntime
    python examples/to_and_from_pytorch.py [--out DIR]
"""
import argparse
import os
import sys
import tempfile

import numpy as np

import fastnn as fn

try:
    import onnxruntime as ort
    import torch
    from torch import nn
except ImportError as exc:
    sys.exit(f"this example needs torch, onnx and onnxruntime ({exc})")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", metavar="DIR",
                    help="where to write cnn.onnx (default: a temporary folder)")
args = parser.parse_args()

rng = np.random.default_rng(0)


def torch_predict(model, x):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def report(what, a, b):
    print(f"{what}: largest difference {float(np.abs(a - b).max()):.2e}")
    assert np.allclose(a, b, rtol=1e-5, atol=1e-5), what      # float32 round-off


# --- 1. fastnn -> PyTorch: an MLP -------------------------------------------------------------
x = rng.normal(size=(512, 8)).astype(np.float32)
y = (x[:, :4].sum(axis=1) > x[:, 4:].sum(axis=1)).astype(np.int64)
mlp = fn.Network([fn.Dense(8, 32, seed=1), fn.ReLU(), fn.Dropout(0.1),
                  fn.Dense(32, 2, seed=2), fn.Softmax()])
mlp.compile(loss="cross_entropy", optimizer=fn.optim.Adam(lr=1e-2))
mlp.fit(x, y, epochs=5, batch_size=32, seed=0, verbose=0)
print(f"MLP trained in fastnn: accuracy {mlp.evaluate(x, y)['accuracy']:.3f}")

torch_mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2),
                          nn.Softmax(dim=-1))
torch_mlp.load_state_dict({k: torch.from_numpy(v) for k, v in mlp.state_dict().items()})
report("MLP, fastnn -> PyTorch", torch_predict(torch_mlp, x), mlp.predict(x))

# --- 1. fastnn -> PyTorch: a CNN with BatchNorm -----------------------------------------------
labels = rng.integers(0, 2, 256)          # 0: horizontal stripes, 1: vertical ones, in noise
stripes = np.tile(np.arange(12) % 2, (12, 1))
images = np.where(labels[:, None, None] == 1, stripes, stripes.T)[:, None]
images = (images + rng.normal(scale=0.5, size=images.shape)).astype(np.float32)
cnn = fn.Network([fn.Conv2D(1, 8, 3, padding=1, seed=3), fn.BatchNorm2d(8), fn.ReLU(),
                  fn.MaxPool2D(2), fn.Conv2D(8, 8, 3, seed=4), fn.ReLU(), fn.GlobalAvgPool2D(),
                  fn.Dense(8, 2, seed=5)])
cnn.compile(loss="cross_entropy", optimizer=fn.optim.Adam(lr=1e-2))
cnn.fit(images, labels, epochs=3, batch_size=32, seed=0, verbose=0)
print(f"CNN trained in fastnn: accuracy {cnn.evaluate(images, labels)['accuracy']:.3f}")

torch_cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(8, 2))
torch_cnn.load_state_dict({k: torch.from_numpy(v) for k, v in cnn.state_dict().items()})
report("CNN, fastnn -> PyTorch", torch_predict(torch_cnn, images), cnn.predict(images))

# --- 2. PyTorch -> fastnn ---------------------------------------------------------------------
torch.manual_seed(0)
torch_model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
torch_model.train()
with torch.no_grad():                 # a few batches move BatchNorm's running statistics
    for _ in range(5):
        torch_model(torch.randn(64, 8))
net = fn.Network([fn.Dense(8, 16), fn.BatchNorm1d(16), fn.Tanh(), fn.Dense(16, 3)])
net.load_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()})
report("PyTorch -> fastnn", net.predict(x), torch_predict(torch_model, x))

# --- 3. ONNX ----------------------------------------------------------------------------------
folder = args.out or tempfile.mkdtemp()
path = os.path.join(folder, "cnn.onnx")
cnn.export(path)
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
report(f"CNN in ONNX Runtime ({path})", session.run(None, {"input": images})[0],
       cnn.predict(images))
report("CNN in ONNX Runtime, one image", session.run(None, {"input": images[:1]})[0],
       cnn.predict(images[:1]))
print("done")
