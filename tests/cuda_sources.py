"""CUDA sources of PB kernels for the SASS and ptxas checks (sm_90, no GPU needed): a default
schedule's, a sampled candidate's, and the CUDA-core candidate an H100 computed wrong (ptxas
dropped its weight load; BENCHMARKS.md, eleventh session), drawn as ``tests/test_gpu.py``'s
``(1, 2048)`` case draws it."""

from __future__ import annotations

from typing import Any

import numpy as np

from pbtvm import bitplane as bp
from pbtvm import kernels
from pbtvm.cuda import build, cuda_source
from pbtvm.schedules import apply_default_schedule, tuning

#: The seed of the ``rng`` fixture in that run (``PBTVM_SEED``'s default).
H100_SEED = 2839081137


def h100_candidates(target: Any) -> tuple[Any, list]:
    """``(func, candidates)``: the W1, K = 2048 integer product and the 3-per-design-space sample
    whose first candidate the H100 got wrong (the rng draws test_gpu.py's data first)."""
    rng = np.random.default_rng(H100_SEED)
    rng.standard_normal((96, 2048))
    rng.standard_normal((3, 2048))
    func = kernels.int_product_func(bp.BitplaneFormat(1, 8), 96, 2048)
    return func, tuning.sample_candidates(func, target, 3, seed=int(rng.integers(1 << 20)))


def candidate_source(func: Any, sch: Any, target: Any) -> str:
    """CUDA C++ of the sampled schedule ``sch`` of ``func`` built for ``target``."""
    return cuda_source(build(tuning.replay(func, sch.trace).with_attr("tirx.is_scheduled", True), target))


def default_source(func: Any, target: Any) -> str:
    """CUDA C++ of ``func`` under its rule's default schedule, built for ``target``."""
    return cuda_source(build(apply_default_schedule(func, target), target))
