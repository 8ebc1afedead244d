"""The float64 oracles the tests compare against: timm's CbamModule re-implemented in plain
PyTorch (kept in the package as `cbam_triton.reference`, where the perf sweep uses it too)."""
from cbam_triton.reference import (TimmCbamModule, TimmChannelAttn, TimmSpatialAttn,
                                   decisive_input)

__all__ = ["TimmCbamModule", "TimmChannelAttn", "TimmSpatialAttn", "decisive_input"]
