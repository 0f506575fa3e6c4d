"""Segmentation scores from a confusion matrix, against values computed by hand."""

import pytest
import torch

from megatron_dchag.segmentation_metrics import ConfusionMatrix


def _matrix():
    # labels (rows) x predictions (columns); -1 is the ignore index
    labels = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [-1, -1, 0, 2]])
    predicted = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2], [2, 1, 0, 0]])
    cm = ConfusionMatrix(3, ignore_index=-1)
    cm.update(predicted, labels)
    return cm


def test_counts_leave_out_the_ignore_index():
    cm = _matrix()
    # true 0: predicted 0,0,1,0 ; true 1: 1,1,2 ; true 2: 2,2,0 ; the two -1 pixels count nowhere
    assert cm.counts.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert cm.total == 10 and cm.support() == [4, 3, 3]


def test_scores_against_hand_computed_values():
    cm = _matrix()
    s = cm.scores()
    assert s["overall_accuracy"] == pytest.approx(7 / 10)
    assert cm.class_accuracy() == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert s["mean_class_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    # IoU = TP / (row + column - TP): class 0: 3 / (4 + 4 - 3), class 1: 2 / (3 + 3 - 2), class 2: 2 / (3 + 3 - 2)
    assert cm.iou() == pytest.approx([3 / 5, 2 / 4, 2 / 4])
    assert s["mean_iou"] == pytest.approx((3 / 5 + 1 / 2 + 1 / 2) / 3)
    # kappa: p_o = 0.7, p_e = (4*4 + 3*3 + 3*3) / 100 = 0.34
    assert s["kappa"] == pytest.approx((0.7 - 0.34) / (1 - 0.34))


def test_labels_outside_the_classes_count_nowhere_and_updates_add():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 255, 7, 1]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    assert cm.counts.tolist() == [[1, 0], [1, 1]]


def test_a_class_without_support_is_left_out_of_the_means():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))  # class 2: never labelled nor predicted
    assert cm.class_accuracy()[2] is None and cm.iou()[2] is None
    assert cm.scores()["mean_class_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert cm.scores()["mean_iou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    table = cm.markdown_table(["a", "b", "c"], "t", "d")
    assert "| 2 | c | 0 | 0 | – | – |" in table


def test_empty_matrix_has_no_scores():
    assert ConfusionMatrix(2).scores() == {"overall_accuracy": None, "mean_class_accuracy": None, "kappa": None,
                                           "mean_iou": None}
