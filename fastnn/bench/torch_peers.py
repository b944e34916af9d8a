"""PyTorch peers of the workloads (eager mode, the way a PyTorch user writes them).

Inputs are converted to tensors once, outside the timed region
(``torch.from_numpy`` shares the NumPy memory on the CPU). Single ops call the
ATen functions autograd itself runs for their backward, so the figures time
the kernels, not graph bookkeeping; the training loops use autograd and
``torch.optim.SGD`` as written in every tutorial.
"""
import torch


def to_tensor(a, device="cpu"):
    t = torch.from_numpy(a)
    return t.to(device) if device != "cpu" else t


def mlp(sizes=(784, 256, 128, 10)):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def lenet():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


class Trainer:
    """One pass over (x, y) in order, batch by batch, SGD with momentum;
    the loss of every batch is read back (``item()``), as fastnn's fit does."""

    def __init__(self, model, x, y, batch_size, lr=0.01, momentum=0.9):
        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(self):
        model, opt, bs = self.model, self.optimizer, self.batch_size
        model.train()
        total, steps = 0.0, 0
        for i in range(0, self.x.shape[0], bs):
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(self.x[i:i + bs]), self.y[i:i + bs])
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        return total / steps


def dense_forward_backward(x, W, b, grad_y):
    """W1: y = x @ W + b (addmm), dX = dY @ W.T, dW = X.T @ dY, db = sum(dY)."""
    y = torch.addmm(b, x, W)
    return y, grad_y @ W.T, x.T @ grad_y, grad_y.sum(0)


def conv_forward_backward(x, W, b, grad_y, padding):
    """W4: conv2d forward, then the one ATen call autograd makes for its backward."""
    y = torch.nn.functional.conv2d(x, W, b, padding=padding)
    grads = torch.ops.aten.convolution_backward(
        grad_y, x, W, [W.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, True, True])
    return y, grads


def maxpool_forward(x):
    return torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)


def maxpool_forward_backward(x, grad_y):
    y, idx = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
        grad_y, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    return y, grad_x


def relu_backward(grad_y, y):
    """What autograd runs for ReLU's backward."""
    return torch.ops.aten.threshold_backward(grad_y, y, 0)
