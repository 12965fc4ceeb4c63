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


def test_device_normaliser_matches_the_host_normalisation_of_stored_values():
    """uint8 is divided by 255 before (x - mean) / std, float16 is only widened: as ImageDataset does per image."""
    from ssl4sci.features import device_normaliser

    mean, std = torch.tensor([0.2, 0.5]), torch.tensor([0.1, 0.25])
    normalise = device_normaliser(mean, std, torch.device("cpu"))
    stored = torch.arange(2 * 2 * 4 * 4, dtype=torch.uint8).reshape(2, 2, 4, 4) * 3
    for batch, scaled in ((stored, stored.float() / 255.0), (stored.half() / 64, (stored.half() / 64).float())):
        out = normalise(batch)
        assert out.dtype == torch.float32
        for image, expected in zip(out, scaled):  # per image, with the (C, 1, 1) statistics ImageDataset uses
            torch.testing.assert_close(image, (expected - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), rtol=0, atol=0)


def test_batched_features_prepare_on_the_device_and_hand_back_every_batch_in_order():
    from ssl4sci.features import batched_features

    batches = [torch.full((n, 2, 3, 3), float(i), dtype=torch.float16) for i, n in enumerate((3, 3, 1))]
    out = list(batched_features(ChannelMeans(), batches, torch.device("cpu"), prepare=lambda x: x.float() * 2))
    assert [f.shape for f in out] == [(3, 2), (3, 2), (1, 2)] and all(f.dtype == np.float32 for f in out)
    assert [float(f[0, 0]) for f in out] == [0.0, 2.0, 4.0]
