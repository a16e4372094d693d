"""What only the jitted Flax twin can get wrong: its step compiling more than once, and its
k steps in one lax.scan differing from k single steps; and its CPU compiler options."""
import functools
import re

import jax
import numpy as np
from flax import nnx

from parity_tests.test_gradients import feeds_batchnorm
from vqvae_common import layout
from vqvae_common.config import ModelConfig, TrainConfig
from vqvae_jax import checkpoint, xla_cpu
from vqvae_jax.train import JaxTwin, train_steps


def test_the_train_step_compiles_once():
    """A state not committed to the device, unlike the step's outputs, made the second step
    miss jit's cache and compile again (4.8 s at every run start and resume)."""
    twin = JaxTwin(ModelConfig(in_channels=1, hidden=8, num_codes=16), TrainConfig(device="cpu"))
    # tests/test_train.py's model and batch shape: a step that XLA compiles once a session
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    for _ in range(3):
        twin.fetch(twin.train_step(batch))
    assert twin._train_step._cache_size() == 1


def test_the_cpu_step_leaves_convolutions_to_xla_and_dots_to_ynnpack():
    """vqvae_jax.xla_cpu.COMPILER_OPTIONS reach the compiled CPU step: its convolutions are
    XLA's own (measured faster than YNNPACK's here), its dots still YNNPACK fusions, and its
    optimization barriers kept (the strided kernel gradients' operands, the argmin's
    distances)."""
    twin = JaxTwin(ModelConfig(in_channels=1, hidden=8, num_codes=16), TrainConfig(device="cpu"))
    batch = np.zeros((8, 28, 28, 1), np.float32)
    lowered = twin._train_step.lower(twin.state, twin._put(batch))
    hlo = lowered.compile().as_text()
    fusions = re.findall(r"calls=(%[\w.\-]+), [^\n]*__ynn_fusion", hlo)
    bodies = [re.search(re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.S).group(1)
              for name in fusions]
    assert any(" dot(" in body for body in bodies)
    assert not any(" convolution(" in body for body in bodies)
    assert " convolution(" in hlo
    barriers = lowered.as_text().count("stablehlo.optimization_barrier")
    assert barriers == 5  # four strided convolutions' kernel gradients, one argmin
    assert hlo.count(" opt-barrier(") == barriers


def test_the_cpu_options_keep_the_passes_xla_flags_disables(monkeypatch):
    """A jit's xla_disable_hlo_passes replaces the one XLA_FLAGS gives (an XLA_FLAGS list
    alone kept a barrier that the jit's own list, naming another pass, let XLA remove), so
    the twin's list carries the user's passes too."""
    cpu = jax.devices("cpu")[0]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                    "--xla_disable_hlo_passes=algsimp,fusion "
                                    "--xla_disable_hlo_passes='dce'")
    passes = xla_cpu.compiler_options(cpu)["xla_disable_hlo_passes"]
    assert passes.split(",") == ["algsimp", "fusion", "dce", "cse_barrier_expander"]
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_cpu.compiler_options(cpu) == xla_cpu.COMPILER_OPTIONS


def test_k_steps_in_one_scan_equal_k_single_steps():
    """float64, so that only the order of operations could differ: the loss terms within
    1e-12 and every weight (but the conv biases feeding a BatchNorm, which Adam moves on the
    sign of rounding noise, and the running means holding them) within 1e-12. Both forms of
    the scan: the loop accelerators run, and the straight-line steps of the CPU twin, which
    must compile without a loop (XLA:CPU runs the kernel gradients inside one on its naive
    convolution emitter: vqvae_jax.train.train_steps)."""
    config = ModelConfig(in_channels=1, hidden=8, num_codes=16)
    batches = list(np.random.default_rng(1).uniform(-1, 1, (2, 8, 28, 28, 1)))
    with jax.enable_x64():
        single, looped, unrolled = (in_float64(JaxTwin(config, TrainConfig(device="cpu")))
                                    for _ in range(3))
        looped._train_steps = jax.jit(functools.partial(
            train_steps, looped.graphdef, unroll=False), donate_argnums=0)
        program = unrolled._train_steps.lower(unrolled.state, np.stack(batches)).as_text()
        assert "stablehlo.convolution" in program and "stablehlo.while" not in program
        last = [single.fetch(single.train_step(batch)) for batch in batches][-1]
        for scanned in (looped, unrolled):
            for term, value in scanned.fetch(scanned.train_steps(batches)).items():
                assert abs(value - last[term]) <= 1e-12 * abs(last[term]), term
        want, *gots = (layout.flax_to_torch(checkpoint.export_arrays(nnx.merge(
            twin.graphdef, twin.state)[0])) for twin in (single, looped, unrolled))
    for got in gots:
        for key in want:
            if not feeds_batchnorm(key) and not key.endswith("running_mean"):
                np.testing.assert_allclose(got[key], want[key], rtol=0, err_msg=key,
                                           atol=1e-12 * np.abs(want[key]).max())


def in_float64(twin: JaxTwin) -> JaxTwin:
    twin.state = jax.device_put(jax.tree.map(
        lambda a: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a,
        twin.state), twin.replicated)
    return twin
