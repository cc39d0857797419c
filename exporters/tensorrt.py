"""TensorRT backend: the ONNX export (decode and prefill graphs) parsed by TensorRT's ONNX
parser and built into two plans, with ``SelectiveHeadAttention`` implemented by polarc's AOT
plugin (``polarc.plugins.tensorrt_plugin``: the Triton kernel compiled to PTX, so the plans
run without Python).

The engine file is polarc's container (safetensors, manifest in its metadata, tokenizer) with
the two serialized plans as byte tensors ``tensorrt.decode`` and ``tensorrt.prefill``: a
generation loop needs both graphs and the tokenizer, and `polarc run` tells the backends apart
by the manifest. To hand a plan to other TensorRT tools, take its bytes out of the container
(``safe_open(path, "pt").get_tensor("tensorrt.decode").numpy().tobytes()``).

TensorRT's builder cannot be installed in polarc's development workplace (PyPI has only stubs
for its libraries), so this module has not been executed there: the ONNX graphs it parses and
the plugin kernel it embeds are checked separately (tests/test_onnx_export.py,
tests/test_tensorrt_plugin*.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from polarc.errors import PolarcError
from polarc.format.engine_file import Engine, plan_tensors, save_container
from polarc.format.tensorrt import require_tensorrt
from polarc.outputs import check_output, writing


def _profile_shapes(engine: Engine, graph: str, max_batch: int, max_seq: int
                    ) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Optimisation profile (min, opt, max) per input: dynamic batch and cache/prompt length."""
    spec = engine.model.spec
    hkv, d = spec.n_kv_heads, spec.head_dim
    if graph == "prefill":  # the runtime prefills one row at a time
        return {"input_ids": ((1, 1), (1, max_seq // 2), (1, max_seq - 1))}
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {
        "input_ids": ((1, 1), (max_batch, 1), (max_batch, 1)),
        "past_seqlens": ((1,), (max_batch,), (max_batch,)),
    }
    for layer in range(spec.n_layers):
        for kind in ("key", "value"):
            shapes[f"past_{kind}_{layer}"] = ((1, hkv, 1, d), (max_batch, hkv, max_seq, d),
                                              (max_batch, hkv, max_seq, d))
    return shapes


def build_plan(trt: Any, onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]]) -> bytes:
    """Parse one ONNX graph and build a serialized plan for the given profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) | \
            (1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise PolarcError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PolarcError(f"TensorRT could not build a plan from {onnx_path.name} (see its log above)")
    return bytes(plan)


def build_tensorrt_engine(engine: Engine, cfg: Any, *, dense: bool = False) -> None:
    """Export ONNX to a scratch folder beside the output, build decode and prefill plans,
    write the container."""
    from polarc.exporters.onnx_export import export_onnx
    from polarc.plugins.tensorrt_plugin import register_plugin

    trt = require_tensorrt()
    check_output(cfg.out, force=cfg.force, inputs=cfg.inputs)
    register_plugin()
    with writing(cfg.out, force=cfg.force, inputs=cfg.inputs) as tmp:
        scratch = tmp.with_name(tmp.name + ".onnx")  # removed with stale temporaries if killed
        scratch.mkdir()
        try:
            decode_onnx, prefill_onnx, _ = export_onnx(engine, scratch / "model.onnx",
                                                       dense=dense, dtype=cfg.dtype)
            plans = {
                "decode": build_plan(trt, decode_onnx,
                                     _profile_shapes(engine, "decode", **engine.limits)),
                "prefill": build_plan(trt, prefill_onnx,
                                      _profile_shapes(engine, "prefill", **engine.limits)),
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tensors = plan_tensors(plans, engine.model.tokenizer)
        manifest = {**engine.manifest, "backend": "tensorrt", "dense": dense,
                    "tensorrt_version": trt.__version__}
        save_container(tensors, manifest, tmp, name=cfg.out)
