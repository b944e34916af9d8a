"""fastnn.bench: the CLI runs and writes a complete report; ratios point the right
way; the NumPy peers compute what they claim (against the reference kernels and
PyTorch). No timing is asserted: figures live in benchmarks/."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fastnn import bench
from fastnn.bench import numpy_peers
from fastnn.bench.timing import Impl, Metric, Result, measure_interleaved
from fastnn.kernels import _reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_w6_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--workload", "W6", "--compare", "numpy", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    for key in ("machine", "versions", "blas", "results", "targets", "environment_at_start"):
        assert key in report
    assert report["machine"]["cpu_model"]
    assert report["versions"]["numpy"] == np.__version__
    assert any(b.get("internal_api") for b in report["blas"])
    rows = {(r["metric"], r["impl"]): r for r in report["results"]}
    assert set(rows) == {(m, i) for m in ("ReLU forward 16M", "ReLU backward 16M")
                         for i in ("fastnn", "numpy", "copy")}
    for r in rows.values():
        assert r["error"] == "" and len(r["seconds_per_call"]) == 3
        assert r["best"] >= r["median"] > 0          # GB/s: the fastest repeat is the best
    assert {t["peer"] for t in report["targets"]} == {"copy", "torch"}
    printed = capsys.readouterr().out
    assert "ReLU forward 16M" in printed and "BLAS in use" in printed


def test_a_missed_target_is_reported_as_a_target_not_a_failure(monkeypatch, capsys):
    """A speed target out of reach prints as "target: ... -- not met", counts in the
    tally, and leaves the exit status 0: targets are goals, not tests."""
    from fastnn.bench import workloads

    def w6_out_of_reach(cfg):
        metrics = workloads.build_w6(cfg)
        for m in metrics:
            m.targets = (("copy", 1e6, ">= 1e6 x copy GB/s"),)
        return metrics
    monkeypatch.setitem(workloads.WORKLOADS, "W6", w6_out_of_reach)
    assert bench.main(["--quick", "--workload", "W6", "--compare", "numpy"]) == 0
    printed = capsys.readouterr().out
    for metric in ("ReLU forward 16M", "ReLU backward 16M"):
        line, = [ln for ln in printed.splitlines() if metric in ln and "target:" in ln]
        assert line.endswith("target: >= 1e6 x copy GB/s -- not met")
    assert "speed targets: 2 not met (goals for a quiet machine, not tests" in printed
    assert not re.search(r"\b(fail|failed|miss|missed)\b", printed, re.IGNORECASE)


def test_target_table_wording():
    row = {"workload": "W1", "metric": "dense fwd+bwd", "impl": "fastnn", "peer": "sgemm (W0)",
           "ratio": 0.8, "ratio_of_best": 0.85, "target": ">= 0.9 x sgemm", "need": 0.9}
    rows = [dict(row, verdict=v) for v in ("not met", "met", "met", "unsure", "n/a")]
    table = bench._table([], rows)
    assert "0.80x   0.85x  target: >= 0.9 x sgemm -- not met" in table
    assert "speed targets: 2 met, 1 not met, 1 unsure, 1 n/a" in table


def test_quick_shrinks_the_conv_batch_only():
    from fastnn.bench.workloads import WORKLOADS, Config
    names = {quick: WORKLOADS["W4"](Config(quick=quick, compare=frozenset()))[0].name
             for quick in (True, False)}
    assert names == {True: "conv3x3 N8 C=K=64 32x32 fwd+bwd",
                     False: "conv3x3 N32 C=K=64 32x32 fwd+bwd"}


def test_torch_alone_times_pytorch_in_its_own_process(tmp_path):
    """--compare torch-alone: every torch row of the workload comes back from the child
    process as a torch-alone row, and PyTorch's targets are judged against it too."""
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    argv = ["--quick", "--workload", "W6", "--compare", "torch,torch-alone", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert "errors" not in report
    rows = {(r["metric"], r["impl"]): r for r in report["results"]}
    for metric in ("ReLU forward 16M", "ReLU backward 16M"):
        alone = rows[(metric, "torch-alone")]
        assert alone["error"] == "" and len(alone["seconds_per_call"]) == 3
        assert alone["median"] > 0 and alone["unit"] == rows[(metric, "torch")]["unit"]
    assert {t["peer"] for t in report["targets"]} == {"copy", "torch", "torch-alone"}


def test_torch_alone_without_pytorch_adds_nothing(monkeypatch):
    """Where PyTorch is not installed the default torch-alone peer is skipped, no error."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    args = bench._parse(["--quick", "--workload", "W6"])
    assert "torch-alone" in args.peers
    assert bench._torch_alone(args, log=lambda *a: None) == ([], None)


@pytest.mark.parametrize("argv, message", [
    (["--workload", "W9"], "unknown workload"),
    (["--compare", "numpy,jax"], "unknown peer"),
    (["--threads", "0"], "--threads must be"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_without_a_gpu_fails_clearly():
    from fastnn import backend
    if backend.cupy() is not None:
        pytest.skip("a CUDA GPU is usable here")
    with pytest.raises(SystemExit) as info:
        bench.main(["--device", "cuda", "--quick", "--workload", "W6"])
    assert "no usable CUDA GPU" in str(info.value.code)


def test_command_line_reexecs_with_threads_and_without_blas_pin(tmp_path):
    """--threads reaches the BLAS, and OPENBLAS_CORETYPE is unset for the run but reported."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", PYTHONPATH=ROOT)
    env.pop("FASTNN_BENCH_ORIGINAL_ENV", None)
    subprocess.run([sys.executable, "-m", "fastnn.bench", "--quick", "--workload", "W0",
                    "--compare", "none", "--threads", "1", "--json", str(out)],
                   check=True, env=env, cwd=str(tmp_path), capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["environment_at_start"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert report["environment_of_run"]["OPENBLAS_CORETYPE"] is None
    assert report["environment_of_run"]["OMP_NUM_THREADS"] == "1"
    assert report["blas_pin_unset"] is True
    blas = [b for b in report["blas"] if b.get("user_api") == "blas"]
    assert blas and all(b["num_threads"] == 1 for b in blas)


def test_measure_interleaves_and_reports_failures():
    order = []
    good = Impl("a", lambda: order.append("a"), work=2.0)
    other = Impl("b", lambda: order.append("b"), work=2.0)

    def broken():
        raise RuntimeError("boom")
    out = measure_interleaved([good, Impl("c", broken, 1.0), other], repeats=3, warmup=2,
                              min_repeat_s=0.0, settle_s=0)
    (inner_a, times_a), failure, (inner_b, times_b) = out
    assert inner_a == inner_b == 1 and len(times_a) == len(times_b) == 3
    assert isinstance(failure, RuntimeError)
    # warm-up + sizing call of each, then the rounds alternate a, b (a short call is
    # re-warmed once before each of its timed repeats)
    assert order[:6] == ["a"] * 3 + ["b"] * 3
    assert order[6:] == ["a", "a", "b", "b"] * 3


def test_result_units():
    rate = Result("W", "m", "x", "GB/s", "rate", work=2.0, times_s=[0.5, 1.0, 2.0])
    assert rate.median == pytest.approx(2.0) and rate.best == pytest.approx(4.0)
    latency = Result("W", "m", "x", "us", "time", work=10, times_s=[1e-3, 2e-3], scale=1e6)
    assert latency.best == pytest.approx(100.0)        # 1 ms for 10 items = 100 us each


def test_targets_are_speed_ratios_in_both_kinds():
    def res(impl, kind, t):
        return Result("W", "m", impl, "u", kind, work=1.0, times_s=[t])
    for kind in ("rate", "time"):
        metric = Metric("W", "m", "u", kind, [], targets=(("torch", 1.25, "t"),))
        rows = bench._targets([metric], [res("fastnn", kind, 1.0), res("torch", kind, 2.0)])
        assert rows[0]["ratio"] == pytest.approx(2.0)     # fastnn twice as fast, either unit
        assert rows[0]["verdict"] == "met"
        rows = bench._targets([metric], [res("fastnn", kind, 2.0), res("torch", kind, 2.0)])
        assert rows[0]["verdict"] == "not met"
        rows = bench._targets([metric], [res("fastnn", kind, 2.0)])
        assert rows[0]["verdict"] == "n/a"
    # medians and best repeats disagree: a neighbour's job slowed some repeats
    fast = Result("W", "m", "fastnn", "u", "rate", work=1.0, times_s=[1.0, 1.0, 1.0])
    peer = Result("W", "m", "torch", "u", "rate", work=1.0, times_s=[9.0, 9.0, 0.5])
    metric = Metric("W", "m", "u", "rate", [], targets=(("torch", 1.25, "t"),))
    row, = bench._targets([metric], [fast, peer])
    assert row["ratio"] == pytest.approx(9.0) and row["ratio_of_best"] == pytest.approx(0.5)
    assert row["verdict"] == "unsure"


# --- the NumPy peers compute what they claim ------------------------------------------

def test_single_op_peers_match_the_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
    grad_y = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    pool = numpy_peers.MaxPool2x2(x)
    y_ref, argmax = _reference.maxpool2d_forward(x, 2, 2, (2, 2))
    np.testing.assert_array_equal(pool.forward(), y_ref)
    np.testing.assert_array_equal(pool.forward_backward(grad_y),
                                  _reference.maxpool2d_backward(grad_y, argmax, x.shape))

    relu = numpy_peers.ReLU(x)
    relu.forward()
    np.testing.assert_array_equal(relu.y, _reference.relu_forward(x))
    g = rng.standard_normal(x.shape).astype(np.float32)
    relu.backward(g)
    np.testing.assert_array_equal(relu.grad_x, _reference.relu_backward(g, relu.y))

    xd = rng.standard_normal((5, 7)).astype(np.float32)
    W = rng.standard_normal((7, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    gy = rng.standard_normal((5, 3)).astype(np.float32)
    dense = numpy_peers.Dense(xd, W, b)
    dense.forward_backward(gy)
    np.testing.assert_allclose(dense.y, _reference.dense_forward(xd, W, b), rtol=1e-5)
    for got, want in zip((dense.grad_x, dense.grad_W, dense.grad_b),
                         _reference.dense_backward(gy, xd, W)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _check_first_step_against_torch(model, torch_model, x, labels, params_map):
    """One SGD step from zero momentum: the velocity is the gradient; compare it
    and the loss with PyTorch on the same weights (float64)."""
    torch = pytest.importorskip("torch")
    for mine, theirs, to_torch in params_map:
        with torch.no_grad():
            theirs.copy_(torch.from_numpy(to_torch(mine.value)))
    loss = torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x)),
                                             torch.from_numpy(labels))
    loss.backward()
    my_loss = model.train_step(x, labels, lr=0.1, momentum=0.9)
    assert my_loss == pytest.approx(loss.item(), rel=1e-10)
    for mine, theirs, to_torch in params_map:
        np.testing.assert_allclose(to_torch(mine.velocity), theirs.grad.numpy(), rtol=1e-8,
                                   atol=1e-12)


def test_numpy_mlp_peer_gradients_match_torch():
    torch = pytest.importorskip("torch")
    from fastnn.bench import torch_peers
    sizes = (12, 9, 7, 4)
    model = numpy_peers.mlp(sizes, seed=3, dtype=np.float64)
    theirs = torch_peers.mlp(sizes).double()
    linears = [m for m in theirs if isinstance(m, torch.nn.Linear)]
    params_map = []
    for layer, lin in zip(model.layers, linears):
        params_map += [(layer.W, lin.weight, lambda a: a.T), (layer.b, lin.bias, lambda a: a)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 12))
    labels = rng.integers(0, 4, 5)
    _check_first_step_against_torch(model, theirs, x, labels, params_map)


def test_numpy_lenet_peer_gradients_match_torch():
    torch = pytest.importorskip("torch")
    from fastnn.bench import torch_peers
    model = numpy_peers.lenet(seed=2, dtype=np.float64)
    theirs = torch_peers.lenet().double()
    conv1, conv2 = model.layers[1], model.layers[3]
    d1, d2, d3 = model.layers[6:9]
    t = theirs

    def conv_w(shape):
        return lambda a: a.reshape(shape)

    def flat_nhwc_to_nchw(a):          # rows in (h, w, c) order -> torch columns in (c, h, w)
        return a.reshape(5, 5, 16, 120).transpose(2, 0, 1, 3).reshape(400, 120).T

    def same(a):
        return a

    def transposed(a):
        return a.T

    params_map = [(conv1.W, t[0].weight, conv_w((6, 1, 5, 5))), (conv1.b, t[0].bias, same),
                  (conv2.W, t[3].weight, conv_w((16, 6, 5, 5))), (conv2.b, t[3].bias, same),
                  (d1.W, t[7].weight, flat_nhwc_to_nchw), (d1.b, t[7].bias, same),
                  (d2.W, t[9].weight, transposed), (d2.b, t[9].bias, same),
                  (d3.W, t[11].weight, transposed), (d3.b, t[11].bias, same)]
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 28, 28))
    labels = rng.integers(0, 10, 3)
    _check_first_step_against_torch(model, theirs, x, labels, params_map)
