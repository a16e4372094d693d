"""The Flax twin data-parallel over 2 devices (XLA's forced host devices on this CPU) is the
same function as on 1 device of the same global batch (vqvae_jax/train.py's mesh): each
step's loss terms, and the final weights, EMA state, code usage and BatchNorm statistics."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
TWO_DEVICES = "--xla_force_host_platform_device_count=2"
LOSS = 1e-9  # float64, relative: each loss term at each of 20 steps
STATE = 1e-9  # float64, relative: every array of model and optimizer, except two kinds.
# A conv bias that feeds a BatchNorm has an exact gradient of 0, so Adam moves it by +-lr
# on the sign of rounding noise, which differs with the order of the sums (1 or 2 devices),
# as in parity_tests/test_training.py: those biases and their Adam moments are left out.
FEEDS_BATCHNORM = re.compile(r"\['(encoder|decoder)'\](\['res\d'\])?\['(conv1|conv2|deconv1)'\]"
                             r"\['bias'\]")
RUNNING_MEAN = 1e-6  # the running means add those biases in (measured: 1.6e-7)


@pytest.fixture(scope="module")
def runs(child_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("devices") / "runs.npz"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "jax_devices_run.py"), str(out)],
                          env={**child_env, "XLA_FLAGS": TWO_DEVICES}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return (json.loads(done.stdout.splitlines()[0]), dict(np.load(out)), done.stderr,
            out.parent / "run")


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def test_two_devices_give_the_one_device_loss_terms_at_every_step(runs):
    one, two = runs[0]["losses"]["float64/1"], runs[0]["losses"]["float64/2"]
    assert len(one) == len(two) == 20
    assert one[-1]["recon"] < one[0]["recon"]
    worst = {k: max(abs(b[k] - a[k]) / abs(a[k]) for a, b in zip(one, two)) for k in one[0]}
    print(f"float64: worst relative difference of each loss term over 20 steps {worst}")
    assert max(worst.values()) <= LOSS


def test_two_devices_end_with_the_one_device_state_in_float64(runs):
    arrays = runs[1]
    keys = [k[len("float64/1/"):] for k in arrays if k.startswith("float64/1/")]
    assert any("ema_sums" in k for k in keys) and any("usage" in k for k in keys)
    worst = {"state": 0.0, "running means": 0.0}
    for key in keys:
        one, two = arrays[f"float64/1/{key}"], arrays[f"float64/2/{key}"]
        if not np.issubdtype(one.dtype, np.floating):
            np.testing.assert_array_equal(two, one, err_msg=key)
        elif not FEEDS_BATCHNORM.search(key):
            kind = "running means" if "['mean']" in key else "state"
            worst[kind] = max(worst[kind], relative(two, one))
            assert relative(two, one) <= (RUNNING_MEAN if kind == "running means" else STATE), key
    print(f"float64 final state, worst relative difference: {worst}")


def test_a_two_device_run_says_so_and_records_it(runs):
    stderr, run = runs[2], runs[3]
    assert "devices: 2 x cpu, global batch 16" in stderr
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["num_devices"], recorded["device_kind"]) == (2, "cpu")


def test_a_batch_that_does_not_split_over_the_devices_is_a_user_error(runs):
    assert runs[0]["batch 15 refused"] == (
        "--batch-size 15 does not split evenly over 2 devices: choose a multiple of 2")
