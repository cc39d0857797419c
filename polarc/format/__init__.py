"""The format layer: what polarc's files hold and how, below both the runtime that reads
engines and the exporters that write them.

- `engine_file.py`: the engine container (safetensors, manifest in its metadata), its tensor
  layout, dtypes;
- `routers.py`: the router dataclasses and their tensors' layout;
- `plan.py`: density plans (k KV groups per layer) and the rules on them;
- `tensorrt.py`: finding a usable TensorRT, for the backend that stores TensorRT plans.
"""
