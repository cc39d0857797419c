"""polarc: Polar Sparsity toolchain (calibrate routers, build sparse engines, run batched decode)."""

__version__ = "0.1.0"
