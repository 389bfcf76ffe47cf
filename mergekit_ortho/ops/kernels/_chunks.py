"""Chunking shared by the elementwise kernels."""
from __future__ import annotations

import torch

# Every full-tensor pass of the TIES/DARE kernels (radix histograms, applying the threshold, the
# DARE mask, the sign election and disjoint mean) walks the tensor in chunks of 256K entries
# (1 MiB of float32): each chunk stays in L2 through all its passes and no full-size temporary
# is allocated. End to end (3 x 271M-entry bf16 models, ties density 0.5, 2 idle cores): 12.4 s
# with 32K-entry chunks (each op below ATen's parallel grain, so on one thread), 8.1 s with 256K,
# 7.7-8.4 s with 1M+. Chunks above the grain run on torch's thread pool; on cores oversubscribed
# by other jobs its parallel regions can stall (seen during development at load ~6: 32K chunks
# were then 10x faster), so set OMP_NUM_THREADS=1 there. On other devices (CUDA) a chunk is the
# whole tensor. Tests lower it to split every pass into many chunks.
CHUNK = (1 << 18) - 1

INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer view of a float


def chunk_len(t: torch.Tensor) -> int:
    """Entries per chunk for tensor t: ``CHUNK`` on the CPU, the whole tensor elsewhere."""
    return CHUNK if t.device.type == "cpu" else max(t.numel(), 1)
