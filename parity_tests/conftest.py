"""Device choice, precision and the report of worst differences for the parity suite.

    pytest parity_tests                          CPU, and the GPU too when both frameworks see one
    pytest parity_tests --parity-device cpu      CPU only (or gpu: GPU only)

On a GPU, TF32 is turned off in both frameworks so that matmuls and convolutions run in
full float32, as they do on the CPU. PyTorch runs its deterministic algorithms.

Every level holds whatever way rounding breaks a tie (parity_tests/ties.py), and
`python parity_tests/matrix.py` proves it under other SIMD levels, thread counts and batch
orders (PARITY_BATCH_ORDER=reversed, parity_tests/inputs.py).
"""
from __future__ import annotations

import json
from collections import defaultdict

import jax
import numpy as np
import pytest
import torch

from vqvae_torch.train import deterministic

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
deterministic()  # else PyTorch's CPU steps differ from run to run

# per device and quantity: the worst relative difference (check, measure) and counts (note)
_WORST: dict[str, dict[str, float]] = defaultdict(dict)
_COUNTS: dict[str, dict[str, float]] = defaultdict(dict)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--parity-device", choices=("all", "cpu", "gpu"), default="all",
                     help="where to compare the twins (all: CPU, and the GPU when present)")
    parser.addoption("--parity-report", default="parity_report.json",
                     help="JSON file for the worst relative difference of each quantity")


def _gpu_missing() -> str | None:
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    try:
        jax.devices("gpu")
    except RuntimeError:
        return "JAX sees no GPU (install jax[cuda12])"
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--parity-device")
        devices = ["cpu", "gpu"] if chosen == "all" else [chosen]
        metafunc.parametrize("device", devices, indirect=True)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "gpu" and (reason := _gpu_missing()):
        pytest.skip(reason)
    return request.param


def relative(a: np.ndarray, b: np.ndarray, scale: float | None = None) -> float:
    """max|a - b| / max|b| (or / scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = scale if scale is not None else np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / max(denom, np.finfo(np.float32).tiny))


@pytest.fixture
def check(device: str):
    """check(quantity, flax_value, torch_value, tol): assert, and keep the worst seen."""

    def _check(quantity: str, got: np.ndarray, want: np.ndarray, tol: float,
               scale: float | None = None) -> float:
        assert np.shape(got) == np.shape(want), f"{quantity}: {np.shape(got)} != {np.shape(want)}"
        diff = relative(got, want, scale)
        _WORST[device][quantity] = max(diff, _WORST[device].get(quantity, 0.0))
        assert diff <= tol, f"{quantity}: relative difference {diff:.3g} > {tol:g}"
        return diff

    return _check


@pytest.fixture
def measure(device: str):
    """measure(quantity, value): record the worst value of a quantity reported, not bounded."""

    def _measure(quantity: str, value: float) -> None:
        _WORST[device][quantity] = max(value, _WORST[device].get(quantity, 0.0))

    return _measure


@pytest.fixture
def note(device: str):
    """note(quantity, value): record a count (e.g. near-ties) in the report."""

    def _note(quantity: str, value: float) -> None:
        _COUNTS[device][quantity] = _COUNTS[device].get(quantity, 0) + value

    return _note


def _merge(worst: dict[str, dict[str, float]], counts: dict[str, dict[str, float]]) -> None:
    for device, quantities in worst.items():
        for quantity, value in quantities.items():
            _WORST[device][quantity] = max(value, _WORST[device].get(quantity, 0.0))
    for device, quantities in counts.items():
        for quantity, value in quantities.items():
            _COUNTS[device][quantity] = _COUNTS[device].get(quantity, 0) + value


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist, a worker hands its figures to the controller, which reports."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity"] = json.dumps({"worst": _WORST, "counts": _COUNTS})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    figures = json.loads(node.workeroutput.get("parity", '{"worst": {}, "counts": {}}'))
    _merge(figures["worst"], figures["counts"])


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not (_WORST or _COUNTS):
        return
    report = {device: {**_WORST.get(device, {}), **_COUNTS.get(device, {})}
              for device in {*_WORST, *_COUNTS}}
    terminalreporter.section("parity: worst relative difference (or count) per quantity")
    for device, quantities in report.items():
        for quantity, value in sorted(quantities.items()):
            terminalreporter.write_line(f"{device:4} {quantity:40} {value:.3g}")
    path = config.getoption("--parity-report")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    terminalreporter.write_line(f"written to {path}")
