"""Features of a dataset through a frozen backbone (ssl4sci.features), with a backbone whose output is known."""
import numpy as np
import torch
from torch import nn

from ssl4sci.features import extract_features


class ChannelMeans(nn.Module):
    """A stand-in backbone: the mean of each channel, so every feature can be written down."""

    num_features = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_features_are_float32_in_dataset_order_from_the_backbone_in_eval_mode():
    images = torch.arange(5 * 2 * 3 * 3, dtype=torch.float32).reshape(5, 2, 3, 3)
    dataset = [(image, label) for label, image in enumerate(images)]
    backbone = ChannelMeans()
    features = extract_features(backbone, dataset, batch_size=2, device=torch.device("cpu"))
    assert features.dtype == np.float32 and features.shape == (5, 2)
    np.testing.assert_allclose(features, images.mean(dim=(2, 3)).numpy(), rtol=1e-6)
    assert not backbone.training
    empty = extract_features(ChannelMeans(), [], batch_size=2, device=torch.device("cpu"))
    assert empty.shape == (0, 2) and empty.dtype == np.float32
