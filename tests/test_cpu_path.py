"""The CPU path: what CPU tensors run without TRITON_INTERPRET, the ops' PyTorch twins
(`_*_torch` in kernels/), checked by the same oracle tests as the kernels.

The suite runs the kernels through the interpreter, and that choice is made once, at import
(kernels._common.INTERPRET). So the test files whose CBAM calls reach the ops run again here, in
a pytest process of their own with TRITON_INTERPRET=0 and no GPU visible: every module, gate,
flavour, L2-order chunk and tie rule of the twins against the float64 oracles, as a CPU user
gets them. Tests that only kernels can pass (the traffic counter, poisoned outputs) skip
themselves there. About 20 s on one core.
"""
from helpers import run_python

REACH_THE_OPS = ["test_cbam.py", "test_gates_errors_traffic.py", "test_l2_order.py",
                 "test_first_max.py", "test_flavours.py", "test_ops.py", "test_hooks.py",
                 "test_attention_maps.py", "test_convert.py", "test_cuda_graphs.py",
                 "test_tuning.py", "test_light.py"]


def test_the_oracle_tests_pass_on_the_pytorch_twins():
    out = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", *REACH_THE_OPS],
                     TRITON_INTERPRET="0")
    # pytest's last line sums the run up ("N passed, M skipped, K warnings in S s"); the rest
    # may name files such as test_gates_errors_traffic.py in a warning's summary.
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, \
        out[-2000:]
