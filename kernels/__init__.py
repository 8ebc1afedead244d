"""cbam_triton's Triton kernels, installed as `cbam_triton.kernels` (never a top-level `kernels`).

Three families, each a file that reads kernel → launcher → PyTorch twin:
- `pool_over_hw`: reductions over H×W per channel (channel descriptors; channel-gate gradient);
- `pool_over_c`: reductions over C per pixel (spatial descriptors; spatial-gate gradient);
- `gating`: elementwise gating and the single-write input gradient.
Each launcher is a `torch.library.triton_op`, so torch.compile traces into the kernels; on CPU
without TRITON_INTERPRET=1 the op runs its PyTorch twin.
"""
from .gating import gate, gate_into, grad_input, grad_input_into
from .pool_over_c import grad_spatial_gate, pool_c
from .pool_over_hw import grad_channel_gate, pool_hw

__all__ = ["pool_hw", "grad_channel_gate", "pool_c", "grad_spatial_gate", "gate", "grad_input",
           "gate_into", "grad_input_into"]
