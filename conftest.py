"""Settings for every test process, made before any test module imports JAX or PyTorch.

pytest-xdist (`-n auto` in pyproject.toml) runs one process per core:
- on a GPU, each JAX process would otherwise take 75% of the GPU's memory at its first
  array, and the second would fail to allocate;
- each takes its share of the cores for PyTorch's threads: two processes of two threads on
  two cores made PyTorch wait a time slice at every op (`pytest -n 2`: 364 s with two
  threads each, 315 s with one; the CIFAR-10 float32 parity training 41.6 s against 24.8).
  An OMP_NUM_THREADS already set (parity_tests/matrix.py's) stands.
- each starts JAX's backends pinned to its share of the cores (Linux), from which XLA sizes
  its CPU thread pool and which that pool's threads keep; then the worker, and the programs
  it starts, get every core back. (On a GPU machine this makes each worker's CUDA context
  at its start, not at its first GPU test.) Two workers' XLA pools of two threads each on
  two cores took turns at each op (plain `pytest`, 2-core Zen 4: 355 s and 629 s of user
  CPU; with the whole worker pinned 315 s and 519 s; pinned for the pool only 315 s and
  538 s, and the real-data trainings the tests start in parallel keep both cores).
- each compiles a JAX computation once (pytest_configure): a persistent compilation cache of
  its own, removed at exit.
"""
import atexit
import os
import shutil
import tempfile

import pytest


def _pin_xla_threads(workers: int) -> None:
    """Starts JAX's backends with this worker's share of the cores as its affinity, which
    XLA's CPU thread pool is sized from and keeps; then gives every core back."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
    if not hasattr(os, "sched_getaffinity") or not worker.isdigit():
        return
    cores = sorted(os.sched_getaffinity(0))
    if share := len(cores) // workers:
        index = int(worker) % workers  # a worker xdist starts in a crashed one's place: gw2...
        os.sched_setaffinity(0, cores[index * share:(index + 1) * share])
        try:
            import jax
            jax.devices()
        finally:
            os.sched_setaffinity(0, cores)


os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    _pin_xla_threads(int(workers))


def pytest_configure(config) -> None:
    """Every test process (not xdist's controller, which runs none) keeps each compiled JAX
    computation in a compilation cache of its own, so that the same HLO compiles once: tests/
    build fresh twins of the same small models again and again (a jitted step: about 3 s),
    and the parity suite runs the Flax twin op by op, each op a compile of about 30 ms that
    JAX's in-memory caches do not always find again (parity_tests/test_forward.py and
    test_gradients.py in one process: 276 of 1708 compiles found in this cache). Plain
    `pytest parity_tests`, 2-core Zen 4, four A/B rounds without / with it: 136 / 143,
    153 / 133, 162 / 153, 139 / 136 s (median ratio 0.96, inside the machine's spread). One
    directory per process: the cache writes its files without a lock (with one, which its
    size limit turns on, the same run took 281 s against 177 s without a cache)."""
    if "PYTEST_XDIST_WORKER" not in os.environ and getattr(config.option, "numprocesses", None):
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    cache = tempfile.mkdtemp(prefix="vqvae-tests-jax-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # it reads the options once, at its first use


@pytest.fixture(autouse=True, scope="session")
def _tempfiles_under_basetemp(tmp_path_factory):
    """Whatever a test, or a program it starts, makes with `tempfile` lands under pytest's
    own temporary directory (which pytest prunes to its last three runs), not in the
    system's: tfds (4.9.10) leaves a tempfile.mkdtemp() directory behind at each builder of
    a dataset it finds unprepared, as under its mock data (tests/test_common_data.py left 16
    in /tmp a run, the programs the whole suite starts 112)."""
    root = str(tmp_path_factory.mktemp("tempfile"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", root)
        patch.setenv("TMPDIR", root)  # the trainers and converters the tests start
        yield


# The modules that take longest (pytest --durations=0 with TFDS_DATA_DIR set, summed by
# module; this machine, stop 39), started first: pytest-xdist hands out modules in
# collection order, and one that starts last becomes the suite's tail. Only the order
# changes; a module not listed keeps its place after these.
SLOWEST_FIRST = ("tests/test_reliability.py", "tests/test_train_cli.py",
                 "parity_tests/test_training.py", "parity_tests/test_gradients.py",
                 "tests/test_model.py", "tests/test_jax_train.py", "tests/test_convert.py",
                 "tests/test_jax_devices.py", "parity_tests/test_data_parallel.py",
                 "tests/test_jax_model.py", "tests/test_bench.py", "parity_tests/test_forward.py",
                 "parity_tests/test_codebook_learning.py", "parity_tests/test_detects_bugs.py",
                 "tests/test_train.py", "tests/test_ddp_torch.py", "tests/test_lr_schedule.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return SLOWEST_FIRST.index(path) if path in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order
