"""ONNX export: a model holding cbam_triton modules exports as it is (each runs its source's
plain forward while torch.onnx.export traces) and after revert(), with fixed or dynamic batch,
height and width, through the TorchScript exporter and the dynamo one (the default since torch
2.9); the exported graph uses standard ONNX ops only, passes the ONNX checker, and onnx's
reference runtime gives our modules' outputs, at other sizes too when they are dynamic."""
import io
import warnings

import pytest
import torch
from torch import nn

from cbam_triton import CBAM, ChannelGate, LightCBAM, SpatialGate, revert
from cbam_triton.flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from helpers import TORCH_VERSION, randomize_norm

onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402


def model_with_every_kind():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        CBAM(32, rd_ratio=1 / 8, act_layer="silu"),
        ChannelGate(32, rd_channels=4),
        SpatialGate(5),
        OfficialCBAM(32, reduction_ratio=8, pool_types=["avg", "max", "lse"]),
        OfficialCBAM(32, pool_types=["max", "lp"], no_spatial=True),
        UltralyticsCBAM(32, kernel_size=3),
        LuuuyiCBAM(32),
        LightCBAM(32, rd_channels=4, spatial_kernel_size=3),
        nn.Conv2d(32, 2, 1))
    return randomize_norm(model).eval()  # exported for inference: BatchNorm's running stats


def export(model, x, dynamic):
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": axes, "y": axes} if dynamic else None)
    exported = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(exported, full_check=True)
    return exported


@pytest.mark.parametrize("how,dynamic", [("as-it-is", False), ("as-it-is", True),
                                         ("reverted", True)])
def test_model_with_cbam_triton_exports_to_onnx(how, dynamic):
    model = model_with_every_kind()
    inputs = [torch.randn(2, 3, 9, 11)] + ([torch.randn(3, 3, 7, 13)] if dynamic else [])
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # our kernels
    if how == "reverted":
        assert len(revert(model)) == len(model) - 2  # all but the two convs
    exported = export(model, inputs[0], dynamic)
    assert {node.domain for node in exported.graph.node} <= {"", "ai.onnx"}, \
        "only standard ONNX operators"
    ops = {node.op_type for node in exported.graph.node}
    assert {"ReduceMean", "ReduceMax", "Conv", "Sigmoid", "Mul"} <= ops
    runtime = ReferenceEvaluator(exported)
    for x, y in zip(inputs, expected):
        (got,) = runtime.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), y, rtol=1e-4, atol=1e-5)
    if how == "as-it-is":  # exporting ran plain copies; the model itself is unchanged
        assert isinstance(model[1], CBAM) and not model.training


def test_model_with_cbam_triton_exports_through_the_dynamo_exporter():
    """torch.onnx.export(..., dynamo=True), which torch 2.9 made the default, traces with
    torch.export. Our modules used to build their plain copy mid-trace, and that exporter
    refused it (its BatchNorm's initialisation mutates a tensor it must keep as a constant)."""
    pytest.importorskip("onnxscript")  # the dynamo exporter needs it
    if TORCH_VERSION < (2, 9):
        pytest.skip("before torch 2.9 the dynamo exporter was not the default, and torch 2.6's "
                    "fails on the plain PyTorch CBAMs (cbam_triton.reference) too")
    model = model_with_every_kind()
    inputs = [torch.randn(2, 3, 9, 11), torch.randn(3, 3, 7, 13)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # our kernels
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"),
            3: torch.export.Dim("width")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(model, (inputs[0],), dynamo=True, dynamic_shapes=(dims,),
                                    verbose=False)
    exported = program.model_proto
    onnx.checker.check_model(exported, full_check=True)
    assert {node.domain for node in exported.graph.node} <= {"", "ai.onnx"}, \
        "only standard ONNX operators"
    runtime = ReferenceEvaluator(exported)
    name = exported.graph.input[0].name
    for x, y in zip(inputs, expected):
        (got,) = runtime.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), y, rtol=1e-4, atol=1e-5)
    assert isinstance(model[1], CBAM) and not model.training
