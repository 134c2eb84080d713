"""Which int8 GEMM backend this machine can use."""
from __future__ import annotations

import functools

# Compute capabilities the cpm_kernels 1.0.11 wheel has code for (no PTX, so nothing newer).
CPM_KERNELS_ARCHS = {(6, 1), (6, 2), (7, 0), (7, 2), (7, 5), (8, 0), (8, 6)}


@functools.lru_cache(maxsize=None)
def cpm_kernels_status() -> tuple[bool, str]:
    """(usable, reason): whether ``cpm_kernels.torch`` can run here, and why not when it cannot."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability not in CPM_KERNELS_ARCHS:
        return False, f"cpm_kernels has no code for sm_{capability[0]}{capability[1]}"
    try:
        import cpm_kernels.torch  # noqa: F401
    except Exception as e:  # it raises at import without a working driver
        return False, f"cpm_kernels failed to import: {e}"
    return True, "ok"
