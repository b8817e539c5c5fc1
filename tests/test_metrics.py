import torch

from lsm_registry.metrics import group_of, summarise_predictions


def test_groups_follow_the_thresholds():
    assert group_of(101) == "many" and group_of(100) == "medium"
    assert group_of(20) == "medium" and group_of(19) == "few"


def test_many_medium_few_on_a_hand_built_prediction_set():
    counts = (500, 150, 50, 30, 10, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    pred = torch.tensor([0, 0, 1, 0, 2, 2, 0, 0, 4, 0, 0, 0])
    result = summarise_predictions(pred, labels, counts)
    assert result["per_class"] == [1.0, 0.5, 1.0, 0.0, 0.5, 0.0]
    assert result["top1"] == 6 / 12
    assert result["many"] == 0.75
    assert result["medium"] == 0.5
    assert result["few"] == 0.25
    # rarest three: classes 5, 4, 3
    assert abs(result["rare3"] - (0.0 + 0.5 + 0.0) / 3) < 1e-12


def test_a_group_without_classes_is_absent_not_zero():
    counts = (500, 300)
    labels = torch.tensor([0, 1])
    result = summarise_predictions(labels.clone(), labels, counts)
    assert result["many"] == 1.0
    assert result["medium"] is None and result["few"] is None
