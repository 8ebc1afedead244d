"""Drawing CBAM's attention maps (matplotlib, imported only when a helper is called)."""
from typing import Optional

import torch
from torch import Tensor


def overlay_spatial_gate(image: Tensor, gate: Tensor, ax=None, alpha: float = 0.5,
                         cmap: str = "jet", title: Optional[str] = None):
    """Draw `image` with its spatial gate on top and return the matplotlib Axes.

    image: C×H×W (C = 1 or 3) or H×W, any range (rescaled to [0, 1] for display).
    gate:  1×h×w or h×w, e.g. `cbam.last_spatial_gate[i]` from a CBAM with keep_attention on;
           resized bilinearly to H×W when the block ran at a lower resolution than the image.
    """
    import matplotlib.pyplot as plt

    image = image.detach().float().cpu()
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be C×H×W with C in (1, 3), or H×W; got {tuple(image.shape)}")
    gate = gate.detach().float().cpu()
    if gate.dim() == 3:
        gate = gate[0]
    if gate.dim() != 2:
        raise ValueError(f"gate must be 1×h×w or h×w, got {tuple(gate.shape)}")
    size = image.shape[1:]
    if tuple(gate.shape) != tuple(size):
        gate = torch.nn.functional.interpolate(gate[None, None], size=size, mode="bilinear",
                                               align_corners=False)[0, 0]
    lo, hi = image.min(), image.max()
    shown = ((image - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0)
    if ax is None:
        _, ax = plt.subplots()
    ax.imshow(shown.squeeze(-1).numpy(), cmap="gray" if shown.shape[-1] == 1 else None)
    ax.imshow(gate.numpy(), cmap=cmap, alpha=alpha)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
