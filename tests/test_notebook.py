"""notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient, the venv's own kernel)."""
import os

import nbformat
from nbclient import NotebookClient
from training_fixtures import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(monkeypatch, tmp_path):
    """Every cell runs without error; the notebook's own asserts check the exact-denoiser
    sampler's mean and std against the closed form and the sampled images for NaN/Inf."""
    # One CPU device, XLA's cheap compilation: the notebook's programs are tiny.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("HOME", str(tmp_path))  # keep the kernel's IPython profile out of ~
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernelspec "python3" runs "python -m ipykernel_launcher"; jupyter_client starts it with
    # this interpreter (sys.executable), so the kernel sees this venv and this checkout.
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": REPO}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    listed = outputs.split("registered samplers: ", 1)[1].split("\n", 1)[0]
    for name in ("ddpm", "ddim", "langevin", "dpm_solver_pp", "edm_heun"):
        assert repr(name) in listed, listed
    assert "(8, 8, 8, 1)" in outputs and "grid (" in outputs
