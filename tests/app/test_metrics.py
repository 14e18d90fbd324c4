"""fpt_fast.app.metrics against scikit-learn on fixed inputs."""
import math

import numpy as np
import pytest
import torch

from fpt_fast.app import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def random_case(num_samples, num_classes, seed, skew=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes))
    logits[np.arange(num_samples), labels] += skew  # some signal so the metrics are not all ~chance
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probabilities


@pytest.mark.parametrize("num_classes,seed", [(2, 0), (3, 1), (5, 2), (7, 3)])
def test_metrics_match_sklearn(num_classes, seed):
    labels, probabilities = random_case(97, num_classes, seed, skew=1.0)
    predictions = probabilities.argmax(1)
    got = metrics.classification_metrics(labels, probabilities)
    assert got["acc"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    for name, fn in (("f1", sklearn_metrics.f1_score), ("precision", sklearn_metrics.precision_score),
                     ("recall", sklearn_metrics.recall_score)):
        assert got[name] == pytest.approx(fn(labels, predictions, average="macro", zero_division=0)), name
    expected_auc = (sklearn_metrics.roc_auc_score(labels, probabilities[:, 1]) if num_classes == 2 else
                    sklearn_metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
    assert got["auc"] == pytest.approx(expected_auc)
    expected_kappa = sklearn_metrics.cohen_kappa_score(labels, predictions, weights="quadratic",
                                                       labels=list(range(num_classes)))
    assert got["kappa"] == pytest.approx(expected_kappa)
    np.testing.assert_array_equal(got["confusion"], sklearn_metrics.confusion_matrix(
        labels, predictions, labels=list(range(num_classes))))


def test_auc_with_tied_scores_matches_sklearn():
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    scores = np.array([0.2, 0.2, 0.5, 0.5, 0.5, 0.1, 0.9, 0.2])  # ties across classes
    assert metrics.binary_auc(scores, labels == 1) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))


def test_class_never_predicted_or_absent():
    labels = np.array([0, 0, 1, 1, 1, 0])
    probabilities = np.array([[0.6, 0.3, 0.1]] * 3 + [[0.2, 0.7, 0.1]] * 3)  # class 2 never occurs
    got = metrics.classification_metrics(labels, probabilities)
    predictions = probabilities.argmax(1)
    for name, fn in (("f1", sklearn_metrics.f1_score), ("precision", sklearn_metrics.precision_score),
                     ("recall", sklearn_metrics.recall_score)):
        assert got[name] == pytest.approx(fn(labels, predictions, average="macro", zero_division=0)), name
    # scikit-learn refuses one-vs-rest AUC with a class missing from the labels; here it is the mean
    # over the classes that have positives and negatives.
    expected = np.mean([sklearn_metrics.roc_auc_score(labels == c, probabilities[:, c]) for c in (0, 1)])
    assert got["auc"] == pytest.approx(expected)


def test_degenerate_inputs_give_nan_not_errors():
    assert math.isnan(metrics.binary_auc([0.1, 0.2], [True, True]))
    assert math.isnan(metrics.quadratic_weighted_kappa(np.array([[3, 0], [0, 0]])))
    got = metrics.classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]))
    assert got["acc"] == 1.0 and math.isnan(got["auc"])


def test_torch_inputs_are_accepted():
    labels, probabilities = random_case(20, 3, 5)
    from_numpy = metrics.classification_metrics(labels, probabilities)
    from_torch = metrics.classification_metrics(torch.from_numpy(labels), torch.from_numpy(probabilities))
    assert from_numpy == from_torch


def test_efficiency_scores():
    # docs/method.md, sections 8 and 9: FPT+ on ViT-B, 1.03% learnable parameters, 736 MB vs 23128 MB.
    assert metrics.ppe(87.12, 0.0103) == pytest.approx(87.12 * math.exp(-math.log10(1.0103)))
    assert metrics.pme(87.12, 736, 23128) == pytest.approx(87.12 * math.exp(-math.log10(736 / 23128 + 1)))
    assert metrics.ppe(0.9, 0.0) == 0.9
    with pytest.raises(ValueError, match="learnable_share"):
        metrics.ppe(0.9, 1.8)
    with pytest.raises(ValueError, match="full_memory"):
        metrics.pme(0.9, 10, 0)


def test_out_of_range_labels_are_rejected():
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)


def test_non_finite_probabilities_give_nan_metrics_never_a_score():
    """A diverged model's NaN probabilities once ranked the samples in listing order: AUC 1.0 here."""
    labels = np.array([0, 0, 1, 1])
    nan = np.full((4, 2), np.nan)
    got = metrics.classification_metrics(labels, nan)
    assert all(math.isnan(got[m]) for m in metrics.METRIC_ORDER)
    assert math.isnan(metrics.binary_auc(nan[:, 1], labels == 1))
    one_inf = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [np.inf, 0.0]])
    got = metrics.classification_metrics(labels, one_inf)
    assert all(math.isnan(got[m]) for m in metrics.METRIC_ORDER)
    assert got["confusion"] == [[2, 0], [0, 1]]  # the samples with finite probabilities
