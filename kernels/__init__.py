"""cbam_triton's Triton kernels, installed as `cbam_triton.kernels` (never a top-level `kernels`).

Three families, each a file that reads kernel → launcher → PyTorch twin:
- `pool_over_hw`: reductions over H×W per channel (channel descriptors; channel-gate gradient);
- `pool_over_c`: reductions over C per pixel (spatial descriptors; spatial-gate gradient);
- `gating`: elementwise gating and the single-write input gradient.
Each launcher is a `torch.library.triton_op` (`_common.cbam_op`), so torch.compile traces into
the kernels, and plain eager code calls it directly; on CPU without TRITON_INTERPRET=1 it runs
its PyTorch twin. A direct call whose tensors have the shapes, strides, dtypes, devices and
layouts of an earlier call's, and its other arguments the same values, replays that call's
launch without running the launcher (`_common.LaunchPlans`); code that patches the launch-time
helpers calls `_common.clear_launch_plans()` after. The gates (cg N×C, sg N×HW, contiguous)
may come in any floating dtype: the kernels read them into the accumulation dtype, so a bf16
gate needs no fp32 copy.

The feature maps (x, dy) may have any strides: where H and W do not fold into one axis the
kernels read a copy (`_common.as_foldable`; a check of about half a µs where they fold). The
`*_into` ops refuse an `out` whose rows do not fit or whose H and W do not fold. Every op
checks x and the small tensors beside it against what its kernel reads (shape, contiguity,
device, dtype, layout: `_common.check_op_inputs`) and names what does not fit.
"""
from . import gating, pool_over_c, pool_over_hw
from ._common import channel_partial_segments
from .gating import gate, gate_into, grad_input, grad_input_into
from .pool_over_c import grad_spatial_gate, pool_c
from .pool_over_hw import grad_channel_gate, pool_hw

# The name of every Triton kernel (`_*_kernel`; the jit helpers are named otherwise): the first
# field of a tuned table's keys (tuning.key_string). One CBAM training step launches each.
KERNEL_NAMES = tuple(name for module in (pool_over_hw, pool_over_c, gating)
                     for name in vars(module) if name.endswith("_kernel"))

__all__ = ["pool_hw", "grad_channel_gate", "pool_c", "grad_spatial_gate", "gate", "grad_input",
           "gate_into", "grad_input_into", "channel_partial_segments"]
