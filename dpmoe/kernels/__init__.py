"""numba-dpex kernels, one module per pipeline stage, each built by a cached factory.

Imported only when a SYCL device is in use, so dpmoe imports (and falls back to the NumPy
reference) on machines without the SYCL stack. Kernels take flat, C-contiguous arrays
(one specialisation per storage kind, not per shape) and sizes as run-time arguments.
"""
