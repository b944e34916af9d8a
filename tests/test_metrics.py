"""fastnn.metrics: accuracy, confusion_matrix, classification_report."""
import numpy as np
import pytest

from fastnn import metrics

# A small case worked out by hand:
#   true 0 0 1 1 2, predicted 0 1 1 1 0
#   confusion (row true, col predicted): [[1,1,0],[0,2,0],[1,0,0]]
#   precision 1/2, 2/3, 0 (class 2 never predicted); recall 1/2, 1, 0; f1 1/2, 4/5, 0
Y_TRUE = np.array([0, 0, 1, 1, 2])
Y_PRED = np.array([0, 1, 1, 1, 0])
CM = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])


def scores_for(labels, num_classes, seed=0):
    """Random scores whose argmax is ``labels``."""
    rng = np.random.default_rng(seed)
    s = rng.random((len(labels), num_classes)).astype(np.float32)
    s[np.arange(len(labels)), labels] += 2.0
    return s


def test_accuracy_labels():
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(3 / 5)
    assert isinstance(metrics.accuracy(Y_TRUE, Y_PRED), float)


def test_accuracy_scores_onehot_and_tutorial_shapes():
    scores = scores_for(Y_PRED, 3)
    onehot = np.eye(3)[Y_TRUE]
    assert metrics.accuracy(Y_TRUE, scores) == pytest.approx(3 / 5)
    assert metrics.accuracy(onehot, scores) == pytest.approx(3 / 5)
    # the tutorial's (N, 1, C) rows
    assert metrics.accuracy(onehot[:, None, :], scores[:, None, :]) == pytest.approx(3 / 5)
    # integer-valued float labels
    assert metrics.accuracy(Y_TRUE.astype(np.float32), Y_PRED) == pytest.approx(3 / 5)


def test_single_score_column_is_a_binary_probability():
    y = np.array([0, 1, 1, 0])
    prob = np.array([[0.2], [0.7], [0.4], [0.5]])   # -> 0 1 0 1
    assert metrics.accuracy(y, prob) == pytest.approx(2 / 4)
    # XOR targets in the tutorial's (4, 1, 1) float shape as y_true
    assert metrics.accuracy(y.reshape(4, 1, 1).astype(np.float32), prob) == pytest.approx(0.5)


def test_non_contiguous_inputs():
    scores = scores_for(np.tile(Y_PRED, 2), 3)
    strided = scores[::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(
        metrics.confusion_matrix(Y_TRUE, strided), metrics.confusion_matrix(Y_TRUE, strided.copy()))


def test_confusion_matrix_by_hand():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CM)
    assert cm.sum() == len(Y_TRUE)


def test_confusion_matrix_num_classes_and_score_columns():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, num_classes=5)
    assert cm.shape == (5, 5)
    np.testing.assert_array_equal(cm[:3, :3], CM)
    assert cm[3:].sum() == 0 and cm[:, 3:].sum() == 0
    # 10 score columns say there are 10 classes even if only 3 occur
    assert metrics.confusion_matrix(Y_TRUE, scores_for(Y_PRED, 10)).shape == (10, 10)


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    expected = np.zeros((7, 7), np.int64)
    for a, b in zip(t, p):
        expected[a, b] += 1
    np.testing.assert_array_equal(metrics.confusion_matrix(t, p, num_classes=7), expected)


def parse_report(text):
    """{row name: [numbers...]} from the report's lines."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "precision":
            continue
        words = 2 if parts[0] in ("macro", "weighted") else 1
        rows[" ".join(parts[:words])] = [float(v) for v in parts[words:]]
    return rows


def test_classification_report_by_hand():
    rows = parse_report(metrics.classification_report(Y_TRUE, Y_PRED))
    expected = {"0": [0.5, 0.5, 0.5, 2], "1": [2 / 3, 1.0, 0.8, 2], "2": [0.0, 0.0, 0.0, 1]}
    for name, values in expected.items():
        np.testing.assert_allclose(rows[name], values, atol=1e-4)
    np.testing.assert_allclose(rows["accuracy"], [0.6, 5], atol=1e-4)
    np.testing.assert_allclose(rows["macro avg"], [(0.5 + 2 / 3) / 3, 0.5, 1.3 / 3, 5], atol=1e-4)
    weighted = [(2 * 0.5 + 2 * 2 / 3) / 5, (2 * 0.5 + 2 * 1.0) / 5, (2 * 0.5 + 2 * 0.8) / 5, 5]
    np.testing.assert_allclose(rows["weighted avg"], weighted, atol=1e-4)


def test_classification_report_names_and_scores():
    text = metrics.classification_report(Y_TRUE, scores_for(Y_PRED, 3),
                                         target_names=["cat", "dog", "bird"])
    rows = parse_report(text)
    assert set(["cat", "dog", "bird"]) <= set(rows)
    np.testing.assert_allclose(rows["dog"], [2 / 3, 1.0, 0.8, 2], atol=1e-4)
    with pytest.raises(ValueError, match="target_names"):
        metrics.classification_report(Y_TRUE, Y_PRED, target_names=["a", "b"])


def test_single_sample():
    assert metrics.accuracy(np.array([3]), np.array([[0.0, 0.1, 0.2, 0.9]])) == 1.0
    np.testing.assert_array_equal(metrics.confusion_matrix([1], [1]), [[0, 0], [0, 1]])


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.confusion_matrix,
                                metrics.classification_report])
def test_length_mismatch(fn):
    with pytest.raises(ValueError, match=r"same length.*5 and 4"):
        fn(Y_TRUE, Y_PRED[:4])


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        metrics.accuracy(Y_TRUE, np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="non-integer"):
        metrics.accuracy(Y_TRUE, np.array([0.2, 1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="negative"):
        metrics.accuracy(Y_TRUE, np.array([0, -1, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metrics.confusion_matrix(Y_TRUE, Y_PRED, num_classes=2)
    with pytest.raises(TypeError, match="numeric"):
        metrics.accuracy(np.array(["a", "b"]), np.array([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy(np.array([], np.int64), np.array([], np.int64))
