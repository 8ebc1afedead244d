"""The package as users get it: a wheel built from this tree, installed on its own.

The kernels live in the repository's top-level kernels/ but install as cbam_triton.kernels: a
top-level `kernels` in site-packages would collide with the package of that name on the index.
The editable install the suite runs from maps the folders by hand, so only a built wheel shows
what lands in site-packages, that the tuned tables perf/tune.py writes into kernels/tuned/ ship
with it (package data), and that the installed package works without this repository."""
import importlib.metadata
import json
import os
import re
import shutil
import tarfile
import zipfile

import pytest

from cbam_triton.kernels import tuning
from helpers import ROOT, run_python

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "cbam_triton", "kernels")
TUNED_NAME = os.path.basename(tuning.table_path("Test GPU"))  # for this Triton version
TUNED_TABLE = {"configs": {
    "_pool_hw_kernel|C=8|HW=30|nchw|float32|ALIGN=1": {"BLOCK_C": 8, "BLOCK_HW": 32,
                                                      "num_warps": 1, "num_stages": 1}}}

# Run from the installed copy: a CBAM through the kernels (interpreted on CPU, compiled on a
# GPU) against the float64 reference, and the tuned table it finds for "Test GPU".
INSTALLED_RUN = """
import json, sys
import torch
import cbam_triton, cbam_triton.kernels
from cbam_triton.kernels import tuning
from cbam_triton.reference import TimmCbamModule

site = sys.argv[1]
for module in (cbam_triton, cbam_triton.kernels, tuning):
    assert module.__file__.startswith(site), (module.__name__, module.__file__, site)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
ours = cbam_triton.CBAM(8).to(device)
reference = TimmCbamModule(8).to(device, torch.float64)
reference.load_state_dict(ours.state_dict())
x = torch.randn(2, 8, 5, 6, device=device, requires_grad=True)
x64 = x.detach().double().requires_grad_(True)
dy = torch.randn_like(x)
y, y64 = ours(x), reference(x64)
(dx,), (dx64,) = torch.autograd.grad(y, x, dy), torch.autograd.grad(y64, x64, dy.double())
torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
print(json.dumps({"version": cbam_triton.__version__, "tuned": tuning.tuned_table("Test GPU")}))
"""


def copy_sources(destination):
    """The files a wheel is built from, without caches or the links a work tree may hold."""
    def skipped(folder, names):
        return [name for name in names
                if name == "__pycache__" or name.endswith(".egg-info")
                or os.path.islink(os.path.join(folder, name))]
    destination.mkdir()
    for name in SOURCES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, destination / name, ignore=skipped)
        else:
            shutil.copy(source, destination / name)


def pip(*args):
    run_python(["-m", "pip", "-q", *args])


def build_backend_or_skip():
    """Building offline needs the setuptools pyproject.toml asks for, which the test extras
    install (so CI has it); an image with an older one (a GPU machine without network) skips."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        needed = int(re.search(r'requires = \["setuptools>=(\d+)"\]', f.read()).group(1))
    try:
        here = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        here = "0 (none)"
    if int(here.split(".")[0]) < needed:
        pytest.skip(f"setuptools {here} here; pyproject.toml's build backend needs >= {needed}")


def build(source, dist):
    """sdist, then the wheel from the unpacked sdist, as `python -m build` releases it (so a
    file the sdist lacks is missing from the wheel too). Offline: the setuptools installed
    here, not one that build isolation would fetch."""
    sdist = run_python(["-c", "import sys; from setuptools import build_meta; "
                        "print(build_meta.build_sdist(sys.argv[1]))", str(dist)], cwd=source)
    with tarfile.open(dist / sdist.split()[-1]) as archive:
        # The "data" filter where this Python has it (3.10.12, 3.11.4 and later).
        archive.extractall(dist, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = [path for path in dist.iterdir() if path.is_dir()]
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(unpacked))
    (wheel,) = dist.glob("*.whl")
    return wheel


def test_wheel_installs_kernels_under_cbam_triton_with_tuned_tables_and_runs(tmp_path):
    build_backend_or_skip()
    source, dist, site = tmp_path / "source", tmp_path / "dist", tmp_path / "site"
    copy_sources(source)
    (source / "kernels" / "tuned" / TUNED_NAME).write_text(json.dumps(TUNED_TABLE))
    dist.mkdir()
    wheel = build(source, dist)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        version = [line.split(": ", 1)[1] for line in archive.read(metadata).decode().splitlines()
                   if line.startswith("Version: ")][0]
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["cbam_triton"]
    dist_info = f"cbam_triton-{version}.dist-info"
    assert {name.split("/")[0] for name in names} == {"cbam_triton", dist_info}, names
    for kernel_file in os.listdir(os.path.join(ROOT, "kernels")):
        if kernel_file.endswith(".py"):
            assert f"cbam_triton/kernels/{kernel_file}" in names, kernel_file
    assert f"cbam_triton/kernels/tuned/{TUNED_NAME}" in names
    assert f"{dist_info}/licenses/LICENSE" in names  # MIT asks for its text to go along

    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    assert sorted(os.listdir(site)) == ["cbam_triton", dist_info]
    # PYTHONPATH puts the installed copy ahead of the editable install the suite runs from, and
    # the working folder is not the repository's; gpu=True: CUDA where there is one.
    out = run_python(["-c", INSTALLED_RUN, str(site)], cwd=tmp_path, interpreter=True, gpu=True,
                     PYTHONPATH=str(site))
    installed = json.loads(out.strip().splitlines()[-1])
    assert installed == {"version": version, "tuned": TUNED_TABLE["configs"]}
