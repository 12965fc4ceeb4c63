"""The supervised pieces shared by fine-tuning and label efficiency (ssl4sci.supervised): metrics and the
label-preserving augmentation of each domain."""
import numpy as np
import pytest
import torch

from ssl4sci.supervised import classification_metrics, regression_metrics


def test_metric_helpers_on_known_cases():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m, _ = classification_metrics(probs, np.array([0, 1, 0, 1]), ["a", "b"])
    assert m["accuracy"] == 1.0 and m["macro_auc"] == 1.0
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]), baseline=2.0)
    assert r["mae"] == pytest.approx(2 / 3) and r["mae_predict_train_mean"] == pytest.approx(4 / 3)


def test_finetune_augments_photos_with_horizontal_flips_only_and_lensing_with_the_dihedral_group():
    """A 90° rotation is a symmetry of the sky, not of a butterfly photo: the domain picks the augmentation."""
    from ssl4sci.supervised import label_preserving_augment

    torch.manual_seed(0)
    img = torch.arange(16.0).reshape(1, 4, 4)
    allowed_photo = {img.flip(-1).numpy().tobytes(), img.numpy().tobytes()}
    photo = {label_preserving_augment("photo")(img).numpy().tobytes() for _ in range(200)}
    assert photo == allowed_photo
    lensing = {label_preserving_augment("lensing")(img).numpy().tobytes() for _ in range(400)}
    assert len(lensing) == 8  # every element of the dihedral group of the square
