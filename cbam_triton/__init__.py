"""cbam_triton: CBAM attention as fused Triton kernels, a drop-in for timm's CbamModule."""
from . import functional
from .functional import cbam, channel_gate, plain_pytorch, spatial_gate
from .convert import Replacement, convert, revert
from .flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from .modules import (CBAM, ChannelGate, LightCBAM, LightChannelGate, LightSpatialGate,
                      SpatialGate)

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "cbam", "channel_gate", "spatial_gate",
           "functional", "plain_pytorch", "convert", "revert", "Replacement", "OfficialCBAM",
           "UltralyticsCBAM", "LuuuyiCBAM", "LightCBAM", "LightChannelGate", "LightSpatialGate"]
__version__ = "0.1.0"
