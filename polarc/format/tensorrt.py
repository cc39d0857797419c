"""TensorRT, where it is installed: the engines of `--backend tensorrt` hold its plans."""

from __future__ import annotations

from typing import Any

from polarc.errors import PolarcError

TENSORRT_MIN = (10, 9)
INSTALL_HINT = ("install TensorRT >= 10.9 with its Python bindings on a machine with an NVIDIA GPU "
                "(pip install 'tensorrt>=10.9' from NVIDIA's package index); --backend torch and "
                "--backend onnx work without it")


def require_tensorrt() -> Any:
    """Import tensorrt (with tensorrt.plugin), or stop with one line saying what to install."""
    try:
        import tensorrt as trt
        import tensorrt.plugin  # noqa: F401 - the plugin API arrived in 10.x
    except ImportError:
        raise PolarcError("TensorRT is not installed", hint=INSTALL_HINT) from None
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < TENSORRT_MIN:
        raise PolarcError(f"TensorRT {trt.__version__} is too old for polarc's plugins",
                          hint=INSTALL_HINT)
    return trt
