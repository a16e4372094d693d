"""Level 7: the twins data-parallel on 2 devices agree with each other: PyTorch's
DistributedDataParallel over 2 gloo processes, and the Flax twin's mesh over 2 CPU devices
(XLA's forced host devices), from the same float64 weights on the same global batches
(parity_tests/data_parallel_run.py runs each in processes of its own).

Every step's loss terms are held to tol.TRAIN_LOSS and the final weights (EMA state and code
usage included) to tol.TRAIN_WEIGHTS, as the 1-device float64 training level holds them
(test_training.py); the Flax run follows PyTorch's code indices, each one it changed proven
a near-tie. Each twin's 2-device run is also held to its own 1-device run, by
tests/test_jax_devices.py and tests/test_ddp_torch.py. The level needs 2 devices of a kind:
on a GPU machine it runs on the CPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from parity_tests import tolerances as tol
from parity_tests.data_parallel_run import BATCH, MODEL, STEPS
from parity_tests.inputs import arrange, smooth_dataset
from parity_tests.test_gradients import feeds_batchnorm
from parity_tests.twins import torch_state
from vqvae_common import data
from vqvae_torch import model as torch_model

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "parity_tests" / "data_parallel_run.py")


def run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                               **env})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(torch's 2-process results, Flax's 2-device results), as data_parallel_run.py writes."""
    folder = tmp_path_factory.mktemp("data-parallel")
    torch.manual_seed(0)
    weights = torch_state(torch_model.VQVAE(MODEL).double())
    batches = np.stack([arrange(b.astype(np.float64)) for b in
                        data.batches(smooth_dataset("mnist", STEPS * BATCH), BATCH, 0, 0)])
    given = {"batches": batches, **{f"state/{k}": v for k, v in weights.items()}}
    np.savez(folder / "given.npz", **given)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         RUN, "torch", str(folder / "given.npz"), str(folder / "torch.npz")], {})
    t = dict(np.load(folder / "torch.npz"))
    np.savez(folder / "given.npz", **given, indices=t["indices"])
    run([sys.executable, RUN, "jax", str(folder / "given.npz"), str(folder / "flax.npz")],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    return t, dict(np.load(folder / "flax.npz"))


def test_two_device_runs_of_the_twins_match(runs, device, check, note):
    if device == "gpu":
        pytest.skip("runs on 2 CPU devices: 2 gloo processes and 2 forced XLA host devices")
    t, f = runs
    assert f["compared"] == STEPS * BATCH * 7 * 7  # every vector of every step was audited
    note("data-parallel: argmin near-ties aligned to PyTorch's index (count)", int(f["aligned"]))
    assert t["loss/recon"][-1] < 0.75 * t["loss/recon"][0], "PyTorch did not learn"
    terms = [k for k in t if k.startswith("loss/")]
    assert len(terms) == 4
    for key in terms:
        check(f"data-parallel float64 {key[5:]} (each of 20 steps)", f[key], t[key],
              tol.TRAIN_LOSS)
    weights = [k[6:] for k in t if k.startswith("state/")]
    assert {"quantizer.ema_sums", "quantizer.usage"} <= set(weights)
    for key in weights:
        if not key.endswith("num_batches_tracked") and not feeds_batchnorm(key):
            check("data-parallel float64 final weights", f[f"state/{key}"], t[f"state/{key}"],
                  tol.TRAIN_WEIGHTS)
