"""Hot numeric code: the int8 GEMM, 2:4 mask search and MoE dispatch.

cpm_kernels is imported lazily: it raises at import time on machines without a working CUDA
driver (and needs setuptools<82 for pkg_resources), so nothing here imports it at module load.
"""
from kernels.backend import cpm_kernels_status
from kernels.gemm import bmm, linear
from kernels.int8 import BACKENDS, int8_backend
from kernels.sparsity import get_mask_function, m4n2_1d, m4n2_2d_best, m4n2_2d_greedy, short_lines

__all__ = ["bmm", "linear", "int8_backend", "BACKENDS", "cpm_kernels_status",
           "m4n2_1d", "m4n2_2d_greedy", "m4n2_2d_best", "get_mask_function", "short_lines"]
