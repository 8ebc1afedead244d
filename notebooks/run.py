"""Run a notebook's code cells top to bottom in one namespace, as a Jupyter kernel would, without
needing Jupyter: how the test suite checks that notebooks/ still runs.

    python notebooks/run.py notebooks/kernel_lab.ipynb [more.ipynb ...]

Figures go to matplotlib's non-interactive backend. Each notebook should run in its own process
(kernel_lab decides TRITON_INTERPRET before importing cbam_triton).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")


def run(path: str) -> None:
    with open(path) as f:
        notebook = json.load(f)
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{path} (cell {index})", "exec"), namespace)


if __name__ == "__main__":
    for notebook_path in sys.argv[1:]:
        run(notebook_path)
        print(f"ran {notebook_path}")
