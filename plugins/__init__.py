"""polarc kernels, one op per module: `selective_attention` (decode attention over each row's
selected KV groups), `selective_gemm` (the selective GEMM pair for ReLU MLPs), `kv_write`
(the decode step's KV append, with its rotary stage and top-k selection), `fp8_linear` (a
linear layer over float8 weights), and `tensorrt_plugin` (the TensorRT plugin around the
attention kernel).

Each kernel module holds its Triton kernel behind a checking wrapper; `reference.py` holds the
plain-torch definitions of all of them and imports no triton, so the runtime's CPU path and
the tests use it anywhere. CPU tensors run the kernels through Triton's interpreter only when
TRITON_INTERPRET=1 was set before triton was imported.
"""

# The TensorRT plugin's identity (`tensorrt_plugin.py`); the ONNX export's custom op carries it.
PLUGIN_NAMESPACE = "polarc"
PLUGIN_NAME = "SelectiveHeadAttention"
PLUGIN_VERSION = "1"
