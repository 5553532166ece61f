"""The fused forward's engine, below the public functions and above the kernels.

One road through it: :mod:`.plan` chooses how a call runs (path, GEMM backend, row layout,
chunk size, memory need), :mod:`.forward` checks the memory and runs the chosen path
(:mod:`.grouped` or :mod:`.per_token`) chunk by chunk on :mod:`.experts`' weights, with the
routing metadata of :mod:`.metadata` and the GEMM backends of :mod:`.gemm`. Nothing here
validates user input: the public functions did (:mod:`dpmoe.validation`).
"""
