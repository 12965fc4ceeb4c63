"""The DINO projection head (ssl4sci.ssl.heads)."""
import torch

from ssl4sci.ssl.heads import DINOHead


def test_head_output_and_frozen_weight_norm_gain():
    head = DINOHead(16, 32, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert DINOHead(16, 32, 8, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
