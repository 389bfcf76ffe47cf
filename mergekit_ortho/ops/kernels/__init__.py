"""Speed kernels of the operators: each computes exactly what a plain formulation in its operator's
file (or in tests/test_kernels.py) computes, only with less memory traffic.

* :mod:`.topk` - the k largest magnitudes by radix select on float bit patterns (TIES trim);
* :mod:`.sign_election` - TIES sign election and disjoint mean on the bit patterns, in place
  (and SCE's erase / weighted merge the same way);
* :mod:`.dare_drop` - DARE's random keep mask from the sign bit of ``u - density``, chunked;
* :mod:`.della_drop` - DELLA's keep probabilities by row rank from one sort of packed keys (no
  rank tensor), then the DARE-style sign-bit mask;
* :mod:`.arc` - SLERP's dot products and weighted sum from the stored weights, on one thread;
* :mod:`.threads` - :func:`~.threads.serial`, one-thread sections for chunked kernels;
* :mod:`.convert` - chunked dtype conversion of fold inputs (raw bf16 weights, minus the base);
* :mod:`.select` - MagMax's in-place chunked ``where(|tau| >= |sel|, tau, sel)``;
* :mod:`.kmeans` - weighted k-means in kernel form (on the Gram matrix), LoRA-LEGO;
* :mod:`.randomized_svd` - seeded randomised range finder (Halko et al.), ``lowrank.factorize``.

Every kernel is tested against its plain formulation in tests/test_kernels.py: bit-equal, except
k-means and the randomised SVD (stated tolerances there). This package imports nothing heavy:
``registry`` imports :mod:`.convert`, and ``merge --help`` must not pay for torch.
"""
