import pytest
import torch

from hiertrans.metrics import calculate_metrics


def logits_for(preds: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float() * 5


def test_hand_computed_four_classes():
    # predictions 0, 1, 1, 3 against targets 0, 1, 2, 3
    metrics = calculate_metrics(logits_for([0, 1, 1, 3], 4), torch.tensor([0, 1, 2, 3]))
    assert set(metrics) == {"accuracy", "precision", "recall", "f1"}  # no top-5 with 4 classes
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["precision"] == pytest.approx((1 + 1 / 2 + 0 + 1) / 4)  # per class: TP / predicted
    assert metrics["recall"] == pytest.approx((1 + 1 + 0 + 1) / 4)  # per class: TP / actual
    assert metrics["f1"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert all(isinstance(v, float) for v in metrics.values())


def test_macro_average_skips_classes_absent_from_predictions_and_targets():
    # predictions 0, 1, 0 against targets 0, 1, 1: classes 2 and 3 never occur
    metrics = calculate_metrics(logits_for([0, 1, 0], 4), torch.tensor([0, 1, 1]))
    assert metrics["precision"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["recall"] == pytest.approx((1 + 1 / 2) / 2)
    assert metrics["f1"] == pytest.approx(2 / 3)


def test_top5_accuracy():
    # 6 classes; the target's rank among the logits is 1, 5 and 6
    outputs = torch.tensor([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])
    metrics = calculate_metrics(outputs, torch.tensor([0, 4, 5]))
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["top5_accuracy"] == pytest.approx(2 / 3)


def test_perfect_predictions_and_integer_dtypes():
    targets = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    metrics = calculate_metrics(logits_for(targets.tolist(), 3).half(), targets)
    assert metrics == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


@pytest.mark.parametrize("outputs, targets, error, match", [
    (torch.randn(4), torch.zeros(4, dtype=torch.long), ValueError, r"shape \(B, C\)"),
    (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), ValueError, "at least 2 classes"),
    (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), ValueError, r"targets must have shape \(4,\)"),
    (torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long), ValueError, r"targets must have shape"),
    (torch.randn(4, 3), torch.zeros(4), TypeError, "integer class indices"),
    (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "floating-point"),
    (torch.randn(2, 3), torch.tensor([0, 3]), ValueError, r"in \[0, 3\)"),
    (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "at least one sample"),
    ([[0.0, 1.0]], torch.zeros(1, dtype=torch.long), TypeError, "must be tensors"),
])
def test_bad_inputs(outputs, targets, error, match):
    with pytest.raises(error, match=match):
        calculate_metrics(outputs, targets)
