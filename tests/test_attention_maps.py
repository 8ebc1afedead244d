"""Keeping the last forward's gates for inspection, and drawing the spatial gate over an image."""
import pytest
import torch

from cbam_triton import CBAM
from conftest import DEVICE
from helpers import decisive_input, oracle_for, randomize_norm


def reference_gates(reference, x):
    """The float64 oracle's channel gate (N×C) and spatial gate (N×1×H×W)."""
    ch, sp = reference.channel, reference.spatial
    x = x.double()
    cg = ch.gate(ch.fc2(ch.act(ch.fc1(x.mean((2, 3), keepdim=True))))
                 + ch.fc2(ch.act(ch.fc1(x.amax((2, 3), keepdim=True)))))
    x1 = x * cg
    sg = sp.gate(sp.conv(torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], 1)))
    return cg.flatten(1), sg


def test_gates_are_not_kept_by_default():
    module = CBAM(6, rd_channels=2).to(DEVICE)
    module(torch.randn(2, 6, 4, 5, device=DEVICE))
    assert not module.keep_attention
    assert module.last_channel_gate is None and module.last_spatial_gate is None


def test_kept_gates_match_the_reference_and_are_detached():
    torch.manual_seed(0)
    module = randomize_norm(CBAM(10, rd_channels=3)).to(DEVICE).eval()
    reference = oracle_for(module, channels=10, rd_channels=3).eval()
    module.keep_attention = True
    x = decisive_input((3, 10, 6, 7), torch.float32).requires_grad_(True)
    module(x).sum().backward()
    cg, sg = reference_gates(reference, x.detach())
    assert module.last_channel_gate.shape == (3, 10)
    assert module.last_spatial_gate.shape == (3, 1, 6, 7)
    assert not module.last_channel_gate.requires_grad and not module.last_spatial_gate.requires_grad
    torch.testing.assert_close(module.last_channel_gate.double(), cg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.last_spatial_gate.double(), sg, rtol=1e-5, atol=1e-6)
    module.keep_attention = False
    assert module.last_channel_gate is None and module.last_spatial_gate is None


def test_overlay_draws_the_gate_resized_over_the_image():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cbam_triton.viz import overlay_spatial_gate

    image = torch.rand(3, 32, 40)
    gate = torch.rand(1, 8, 10)
    fig, ax = plt.subplots()
    assert overlay_spatial_gate(image, gate, ax=ax, title="gate") is ax
    shown = ax.get_images()
    assert len(shown) == 2 and shown[1].get_array().shape == (32, 40)
    plt.close(fig)
    # A grey H×W image and an h×w gate of its size: drawn as they are, on new axes.
    grey, same_size = torch.rand(12, 9), torch.rand(12, 9)
    ax = overlay_spatial_gate(grey, same_size)
    shown = ax.get_images()
    assert shown[0].get_array().shape == (12, 9) and shown[0].get_cmap().name == "gray"
    assert torch.equal(torch.as_tensor(shown[1].get_array()), same_size)
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="C×H×W"):
        overlay_spatial_gate(torch.rand(2, 5, 5), gate)
    with pytest.raises(ValueError, match=r"gate must be 1×h×w or h×w, got \(1, 1, 5, 5\)"):
        overlay_spatial_gate(torch.rand(5, 5), torch.rand(1, 1, 5, 5))
