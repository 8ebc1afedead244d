"""The float64 oracles for cbam_triton.flavours: the official, ultralytics and luuuyi CBAMs
re-implemented in plain PyTorch (kept in the package as `cbam_triton.reference`, where revert()
uses them too)."""
from cbam_triton.reference import PlainOfficialCBAM as RefOfficialCBAM
from cbam_triton.reference import PlainLuuuyiCBAM as RefLuuuyiCBAM
from cbam_triton.reference import PlainUltralyticsCBAM as RefUltralyticsCBAM

__all__ = ["RefOfficialCBAM", "RefUltralyticsCBAM", "RefLuuuyiCBAM"]
