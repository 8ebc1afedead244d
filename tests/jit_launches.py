"""What Triton's own JITFunction.run hands a compiled kernel's launcher, against what a launch
plan's direct launch hands it (kernels._common.DirectLaunch), for every launch of CBAM's training
steps and inference forwards, on a CPU.

Run in a process of its own without TRITON_INTERPRET (tests/test_ops.py does): the kernels are
then JITFunctions, as on a GPU. cbam_triton's launches are captured up to Triton's run
(perf/host_time.py's stub); each is then run through the installed Triton's real
JITFunction.run (binding, specialization, cache key) with a stand-in driver (device 0, an
sm_90 target, stream 7) and a kernel cache whose every entry is a stand-in compiled kernel
that records its launcher's arguments; and through DirectLaunch with the same stand-in. The
two argument lists must agree, tensors given as their addresses by the direct launch.
"""
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "perf"))


class StandInDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class StandInCompiled:
    """A compiled kernel whose launcher records what it is given."""

    function, packed_metadata = "handle", "packed metadata"

    def __init__(self):
        self.launches = []

    def launch_metadata(self, grid, stream, *params):
        return ("metadata", len(params))

    def run(self, *launch):
        self.launches.append(launch)


class EveryKeyCached(dict):
    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def get(self, key, default=None):
        return self.compiled


def captured_launches():
    """(kernel, args, kwargs) of each launch of a training step and an inference forward of a
    CBAM, NCHW and channels_last, as tuning.launch makes them (one config per launch)."""
    import host_time

    from cbam_triton import CBAM
    real_run, launches = JITFunction.run, []
    host_time.stub_gpu_launches(lambda kernel, *args, **kwargs:
                                launches.append((kernel, args, kwargs)))
    torch.manual_seed(0)
    module = CBAM(24, rd_channels=6)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 24, 5, 7).contiguous(memory_format=fmt).requires_grad_(True)
        y = module(x)
        torch.autograd.grad(y, [x, *module.parameters()], torch.randn_like(y))
        with torch.no_grad():
            module.eval()(x)
        module.train()
    JITFunction.run = real_run
    return launches


def check() -> None:
    from cbam_triton.kernels._common import DirectLaunch
    launches = captured_launches()
    triton.runtime.driver.set_active(StandInDriver())
    grid = (5, 3)
    for kernel, args, kwargs in launches:
        compiled = StandInCompiled()
        kernel_cache, key_cache, target, backend, binder = kernel.device_caches[0]
        kernel.device_caches[0] = (EveryKeyCached(compiled), key_cache, target, backend, binder)
        kernel.run(*args, grid=grid, warmup=False, **kwargs)
        direct = DirectLaunch.of(kernel, compiled, grid, args, kwargs, 0)
        assert direct is not None and direct.launch(list(args)), kernel.__name__
        through_jit, through_direct = compiled.launches
        addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a
                          for a in through_jit)
        differ = [i for i, (a, b) in enumerate(zip(addresses, through_direct)) if a != b]
        assert through_direct == addresses, (kernel.__name__, len(addresses),
                                             len(through_direct), differ[:3])
        assert through_jit[:7] == (5, 3, 1, 7, "handle", "packed metadata",
                                   ("metadata", len(through_jit) - 9)), through_jit[:7]
    kernels = sorted({kernel.__name__ for kernel, _, _ in launches})
    print(f"direct launches match JITFunction.run: {len(launches)} launches of {kernels}")


if __name__ == "__main__":
    check()
