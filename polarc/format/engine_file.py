"""The engine file: one safetensors container (loads with mmap, no pickle) holding the
weights in the engine's dtype, the routers, the tokenizer and a JSON manifest in its metadata.

Tensor layout (format version 2):

- ``weights.<name>``: the model's weights in the fused layout of `polarc.models.layers`
  (``layers.{i}.qkv.weight``, ``layers.{i}.gate_up.weight``, ...; no views, no tied
  ``lm_head``). On a layer with a head router, the router's ``Hkv`` rows are appended to
  ``qkv.weight`` (and its bias to ``qkv.bias``, zeros above it where the model has none), so
  the decode step gets q, k, v and the router scores from one GEMM. ReLU models (OPT) store
  ``down.weight`` neuron-major (``[F, d]``, the transpose), the layout the selective GEMM
  streams; dense GEMMs read it through a transposed view.
- FP8 weights (``weight_dtype`` fp8_e4m3 in the manifest): every linear layer's weight
  (``qkv``, ``o``, ``gate_up``, ``down``, ``up``, an untied ``lm_head``) is float8 e4m3 with
  ``weight_scales.<name>`` (fp32, a scale per stored row); embeddings and norms stay in the
  engine's dtype. FP8 KV (``kv_dtype``): ``kv.scales [2, layers, Hkv]`` fp32.
- ``rope.inv_freq`` (fp32, rotary models); ``routers.layers.{i}.mlp.w1|w2|b2`` (MLP routers,
  see `routers.py`); ``tokenizer.json`` (uint8 bytes of a Hugging Face tokenizer.json, absent
  for byte tokenizers); TensorRT backend: ``tensorrt.decode`` / ``tensorrt.prefill`` (uint8
  bytes of serialized plans) instead of weights.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from polarc.errors import PolarcError, first_line
from polarc.format.manifest import Manifest, validated
from polarc.format.routers import HeadRouter, MLPRouter, mlp_router_tensors
from polarc.models.layers import add_part_views, stored_weights
from polarc.models.load import Model
from polarc.models.presets import ModelSpec
from polarc.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from polarc.outputs import write_failure, writing

ENGINE_FORMAT = "polarc-engine"
ENGINE_FORMAT_VERSION = 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, n_params: int) -> str:
    """``auto`` → fp32 below 1B parameters, else bf16; other names checked."""
    if dtype == "auto":
        return "fp32" if n_params < 1e9 else "bf16"
    if dtype not in DTYPES:
        raise PolarcError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


@dataclass
class Engine:
    """An engine as loaded (or assembled in memory by the exporters before writing)."""

    path: Path
    manifest: dict[str, Any]
    model: Model
    k_per_layer: list[int]
    head_routers: dict[int, HeadRouter]
    mlp_routers: dict[int, MLPRouter]
    plans: dict[str, bytes] | None = None  # TensorRT backend: serialized decode/prefill plans
    kv_scales: torch.Tensor | None = None  # FP8 KV: [2 (K, V), layers, Hkv] float32
    # FP8 KV: [layers, Hkv, D] float32, subtracted from every stored key (in the key basis)
    kv_key_offset: torch.Tensor | None = None

    @property
    def kv_dtype(self) -> str | None:
        """'fp8_e4m3' for an FP8 KV cache; None: the engine's dtype."""
        return self.manifest.get("kv_dtype")

    @property
    def key_rotation(self) -> str | None:
        """'hadamard' when an FP8 cache stores rotated keys (`reference.hadamard`)."""
        return self.manifest.get("kv_key_rotation")

    @property
    def backend(self) -> str:
        return self.manifest.get("backend", "torch")

    @property
    def limits(self) -> dict[str, int]:
        return self.manifest["limits"]


# ----------------------------------------------------------------------------- writing


def tokenizer_json(tok: Tokenizer) -> bytes | None:
    """The Hugging Face tokenizer.json of `tok` (None for byte tokenizers)."""
    if isinstance(tok, HFTokenizer):
        return tok.tok.backend_tokenizer.to_str().encode("utf-8")
    return None


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def attach_routers(model: Model, head: dict[int, HeadRouter]) -> dict[int, HeadRouter]:
    """Put each head router's rows after its layer's fused q/k/v weight (and bias) in
    `model`, as an engine holds them (module docstring); in place, on a model the caller
    owns. Returns the routers as views of those rows."""
    spec, w = model.spec, model.weights
    attached = {}
    for layer, router in head.items():
        p = f"layers.{layer}.qkv."
        qkv = w[p + "weight"]
        if qkv.shape[0] != spec.qkv_rows:
            raise ValueError(f"layer {layer} already holds rows past q, k and v")
        bias = w.get(p + "bias", torch.zeros(spec.qkv_rows, dtype=qkv.dtype, device=qkv.device))
        w[p + "weight"] = torch.cat([qkv, router.weight.to(qkv.device, qkv.dtype)])
        w[p + "bias"] = torch.cat([bias, router.bias.to(qkv.device, qkv.dtype)])
        add_part_views(w, spec, [layer])
        attached[layer] = HeadRouter(weight=w[p + "weight"][spec.qkv_rows:],
                                     bias=w[p + "bias"][spec.qkv_rows:], k=router.k,
                                     recall=router.recall)
    return attached


FP8_LINEARS = (".qkv.weight", ".o.weight", ".gate_up.weight", ".down.weight", ".up.weight")
FP8_WEIGHT_MAX = 448.0  # float8 e4m3's largest finite value (plugins' FP8_MAX; they import nothing)
FP8_WEIGHT_DTYPE = torch.float8_e4m3fn


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight matrix ``[rows, cols]`` as float8 e4m3 with a scale per row (its largest
    value maps to ±448): (q, scale [rows] float32); ``q.float() * scale[:, None]`` is w."""
    scale = w.float().abs().amax(1).clamp_min(1e-12) / FP8_WEIGHT_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_WEIGHT_MAX, FP8_WEIGHT_MAX).to(
        FP8_WEIGHT_DTYPE), scale


# Kept float8 weights are laid out tile by tile in memory (`tile_fp8`): the FP8 linear
# kernel's program then reads each K block of its weight as one contiguous run, which took a
# step's FP8 GEMMs from 3.69 to 3.44 ms on the H100 (RESULTS.md, 2026-12-05).
FP8_TILE = (128, 128)  # (rows, K) of a tile: the kernel's BLOCK_N and BLOCK_K


def tile_fp8(w: torch.Tensor, *, swiglu: bool = False,
             tile: tuple[int, int] = FP8_TILE) -> torch.Tensor:
    """A float8 weight ``[N, K]`` as ``[cdiv(N, 128), cdiv(K, 128), 128, 128]`` (tile (i, j)
    holds rows 128i.. and columns 128j.., zero-padded past N and K), with `swiglu` (a fused
    gate_up ``[gate; up]``) its rows first interleaved gate 0, up 0, gate 1, ... so that a
    tile pairs the two halves of the same channels (`polarc.plugins.fp8_linear`). `tile`:
    another (rows, K) tile, for benchmarks. A 16-bit weight is tiled alike (`tile` in its
    values: (128, 64) keeps a K block at 16 KB; `fp8_linear` reads 16-bit tiles too)."""
    n, k = w.shape
    if swiglu:
        w = w.view(2, n // 2, k).transpose(0, 1).reshape(n, k)
    bits = _SAME_SIZE_INT[w.element_size()]
    (bn, bk), u = tile, w.view(bits)
    nb, kb = -(-n // bn), -(-k // bk)
    if (nb * bn, kb * bk) != (n, k):  # (a copy only where padding is needed: big weights)
        u = torch.zeros(nb * bn, kb * bk, dtype=bits, device=w.device)
        u[:n, :k] = w.view(bits)
    return u.reshape(nb, bn, kb, bk).transpose(1, 2).contiguous().view(w.dtype)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16}  # (views that copy and pad bit for bit)


# 16-bit weights' tiles: 128 x 64 values keep a K block at the float8 tiles' 16 KB
WIDE_TILE = (128, 64)


def tile_fp8_weights(weights: dict[str, torch.Tensor], *, wide: bool = False) -> None:
    """Every float8 ``[N, K]`` weight of a weights dict laid out by `tile_fp8`, in place (a
    gate_up's rows paired for its SwiGLU): how float8 weights are kept on CUDA. `wide`: the
    16-bit linear layers' weights too (`fp8_weight_names`; an LM head that is the embedding
    table stays ``[N, K]``), in `WIDE_TILE` tiles, each with ``<name>_scale`` ones (float32
    [N]), so that they take the FP8 linear kernel at every row count (`Kernels`; a gate_up
    read without its SwiGLU is untiled for cuBLAS). No part views may point into them (add them
    after: `add_part_views` skips tiles)."""
    for name in [n for n, t in weights.items() if t.dtype == FP8_WEIGHT_DTYPE and t.dim() == 2]:
        weights[name] = tile_fp8(weights[name], swiglu=name.endswith(".gate_up.weight"))
    for name in wide_linear_names(weights) if wide else ():
        w = weights[name]
        weights[name + "_scale"] = torch.ones(w.shape[0], device=w.device)
        weights[name] = tile_fp8(w, swiglu=name.endswith(".gate_up.weight"), tile=WIDE_TILE)


def wide_linear_names(weights: dict[str, torch.Tensor]) -> list[str]:
    """The 16-bit ``[N, K]`` linear layers' weights of a weights dict (`fp8_weight_names`),
    less an LM head that is the embedding table (the embedding gathers its rows)."""
    tied = weights.get("lm_head.weight") is weights.get("embed.weight")
    return [n for n in fp8_weight_names(weights) if weights[n].dim() == 2
            and weights[n].element_size() == 2 and not (n == "lm_head.weight" and tied)]


def wide_tile_names(weights: dict[str, torch.Tensor]) -> list[str]:
    """The 16-bit linear layers' weights of a weights dict kept as tiles
    (`tile_fp8_weights(wide=True)`)."""
    return [n for n, t in weights.items() if t.dim() == 4 and t.element_size() == 2]


def lay_out_wide_linears(engine: Engine, *, tiles: bool) -> None:
    """An engine's 16-bit linear layers' weights re-laid in place: as `WIDE_TILE` tiles with
    ``<name>_scale`` ones (`tile_fp8_weights(wide=True)`), or back to ``[N, K]`` rows (those
    scales dropped). Part views go first, so that each old layout is freed as its new one is
    made, and are made again; the head routers, views of the rows appended to a qkv weight,
    get rows of their own. Nothing moves where the weights are so laid out already, or in a
    ReLU model (its down weight a transposed view)."""
    w, spec = engine.model.weights, engine.model.spec
    if spec.relu_mlp or not (wide_linear_names(w) if tiles else wide_tile_names(w)):
        return
    if tiles:
        for layer, router in engine.head_routers.items():
            engine.head_routers[layer] = replace(router, weight=router.weight.clone())
    for name in set(w) - set(stored_weights(w, spec)) - {"lm_head.weight"}:
        del w[name]
    if tiles:
        tile_fp8_weights(w, wide=True)
    else:
        k_of = {"o": spec.n_heads * spec.head_dim, "down": spec.intermediate}
        for name in wide_tile_names(w):
            w[name] = untile_fp8(w[name], w.pop(name + "_scale").shape[0],
                                 k_of.get(name.split(".")[-2], spec.hidden),
                                 swiglu=name.endswith(".gate_up.weight"))
    add_part_views(w, spec)


def untile_fp8(t: torch.Tensor, n: int, k: int, *, swiglu: bool = False) -> torch.Tensor:
    """`tile_fp8`'s inverse: the weight ``[n, k]`` (a copy)."""
    nb, kb, bn, bk = t.shape
    w = t.view(_SAME_SIZE_INT[t.element_size()]).transpose(1, 2).reshape(nb * bn, kb * bk)[:n, :k]
    if swiglu:
        w = w.reshape(n // 2, 2, k).transpose(0, 1).reshape(n, k)
    return w.contiguous().view(t.dtype)


def widen_fp8(w: torch.Tensor, scale: torch.Tensor, k: int, dtype: torch.dtype, *,
              swiglu: bool = False) -> torch.Tensor:
    """The dequantized weight ``[n, k]`` (``w[n] * scale[n]`` in fp32, rounded once to
    `dtype`: what prefill hands cuBLAS) from a float8 weight, ``[n, k]`` or in `tile_fp8`'s
    tiles (`swiglu`: its gate_up layout), n = ``len(scale)``. Two passes over the output: a
    copy that widens and puts every tile in place through strided views (no ``[n, k]``
    float8 or fp32 temporaries), then the scale in place (fp32 math)."""
    n = scale.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    if w.dim() == 2:
        out.copy_(w)
    else:
        nb, kb, bn, bk = w.shape
        if (nb * bn, kb * bk) != (n, k):
            out.copy_(untile_fp8(w, n, k, swiglu=swiglu))  # padded (small) weights
        elif swiglu:  # layout row bn*i + 2c + h is row h*n/2 + bn/2*i + c
            out.view(2, nb, bn // 2, kb, bk).permute(1, 3, 2, 0, 4).copy_(
                w.view(nb, kb, bn // 2, 2, bk))
        else:
            out.view(nb, bn, kb, bk).transpose(1, 2).copy_(w)
    return out.mul_(scale[:, None])


def fp8_weight_names(names: Any) -> list[str]:
    """Of stored weight names, the linear layers' that FP8 weights quantize."""
    return sorted(n for n in names if n.endswith(FP8_LINEARS) or n == "lm_head.weight")


def engine_tensors(model: Model, mlp: dict[int, MLPRouter], dtype: torch.dtype,
                   kv_scales: torch.Tensor | None = None,
                   kv_key_offset: torch.Tensor | None = None, fp8_weights: bool = False
                   ) -> dict[str, torch.Tensor]:
    """The container's tensors for `model` (head routers attached), its MLP routers and,
    for an FP8 KV cache, the scales [2, layers, Hkv] and key offsets [layers, Hkv, D]; with
    `fp8_weights`, the linear layers' weights in float8 with a scale per row."""
    spec = model.spec
    weights = {name: t.to(dtype) for name, t in stored_weights(model.weights, spec).items()}
    if spec.relu_mlp:
        for layer in range(spec.n_layers):
            name = f"layers.{layer}.down.weight"
            weights[name] = weights[name].T
    tensors = {"weights." + name: t.contiguous() for name, t in weights.items()}
    if fp8_weights:
        for name in fp8_weight_names(weights):
            q, scale = quantize_rows(weights[name])
            tensors["weights." + name], tensors["weight_scales." + name] = q, scale
    if model.rope_inv_freq is not None:
        tensors["rope.inv_freq"] = model.rope_inv_freq.float().contiguous()
    for name, t in mlp_router_tensors(mlp).items():
        tensors["routers." + name] = t
    tok = tokenizer_json(model.tokenizer)
    if tok is not None:
        tensors["tokenizer.json"] = _bytes_tensor(tok)
    if kv_scales is not None:
        tensors["kv.scales"] = kv_scales.float().contiguous()
    if kv_key_offset is not None:
        tensors["kv.key_offset"] = kv_key_offset.float().contiguous()
    return tensors


def plan_tensors(plans: dict[str, bytes], tok: Tokenizer) -> dict[str, torch.Tensor]:
    """A TensorRT-backend container's tensors: its serialized plans and the tokenizer."""
    tensors = {f"tensorrt.{name}": _bytes_tensor(data) for name, data in plans.items()}
    tok_json = tokenizer_json(tok)
    if tok_json is not None:
        tensors["tokenizer.json"] = _bytes_tensor(tok_json)
    return tensors


def save_container(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path, *,
                   name: Path) -> None:
    """The container's bytes at `path` (a temporary: `name` is what errors call it), with the
    tensors' checksums added to the manifest."""
    from safetensors import SafetensorError

    manifest = {**manifest, "checksums": {
        "algorithm": "xxh3_64", "tensors": {k: _digest(t) for k, t in tensors.items()}}}
    try:
        save_file(tensors, str(path), metadata={"format": ENGINE_FORMAT,
                                                "format_version": str(ENGINE_FORMAT_VERSION),
                                                "manifest": json.dumps(manifest)})
    except SafetensorError as exc:
        raise write_failure(name, exc) from None


def write_container(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], out: Path, *,
                    force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write an engine file atomically (rules: `polarc.outputs`)."""
    with writing(out, force=force, inputs=inputs) as tmp:
        save_container(tensors, manifest, tmp, name=out)


# ----------------------------------------------------------------------------- reading


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a polarc engine file, checked against its schema, or a one-line error
    saying what `path` is not."""
    if not path.is_file():
        raise PolarcError(f"engine file {path} does not exist")
    if not _looks_like_safetensors(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"ftrt":
            raise PolarcError(f"{path} is a bare TensorRT plan, not a polarc engine",
                              hint="polarc run takes the engine polarc build --backend tensorrt writes")
        hint = "build one with polarc build"
        if path.suffix == ".onnx":
            hint = "an ONNX export runs under TensorRT: polarc build --backend tensorrt"
        raise PolarcError(f"{path} is not a polarc engine", hint=hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        raise PolarcError(f"{path} is truncated or corrupt", hint="rebuild it with polarc build") from None
    if meta.get("format") != ENGINE_FORMAT or "manifest" not in meta:
        raise PolarcError(f"{path} is a safetensors file but not a polarc engine")
    try:
        manifest = json.loads(meta["manifest"])
    except ValueError:
        raise PolarcError(f"{path} has a manifest that is not valid JSON",
                          hint="rebuild it with polarc build") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is int and version != ENGINE_FORMAT_VERSION:
        raise PolarcError(f"{path} has engine format {version}; this polarc runs format "
                          f"{ENGINE_FORMAT_VERSION}", hint="rebuild it with polarc build")
    return validated(Manifest, manifest, f"the manifest of {path}").model_dump()


def expected_shapes(manifest: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a torch-backend engine of this manifest holds, with its shape."""
    spec = ModelSpec(**manifest["spec"])
    d, f, v = spec.hidden, spec.intermediate, spec.vocab
    ks = manifest["plan"]["k_per_layer"]
    shapes: dict[str, tuple[int, ...]] = {"weights.embed.weight": (v, d), "weights.norm.weight": (d,)}
    if not spec.tie_embeddings:
        shapes["weights.lm_head.weight"] = (v, d)
    if manifest.get("kv_dtype") is not None:
        shapes["kv.scales"] = (2, spec.n_layers, spec.n_kv_heads)
    if manifest.get("kv_key_offset"):
        shapes["kv.key_offset"] = (spec.n_layers, spec.n_kv_heads, spec.head_dim)
    if spec.rotary:
        shapes["rope.inv_freq"] = (spec.head_dim // 2,)
    else:
        shapes["weights.pos_embed.weight"] = (spec.max_positions + 2, d)
        shapes["weights.norm.bias"] = (d,)
    for layer, k in enumerate(ks):
        p = f"weights.layers.{layer}."
        rows = spec.qkv_rows + (spec.n_kv_heads if k < spec.n_kv_heads else 0)
        shapes.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                       p + "qkv.weight": (rows, d), p + "o.weight": (d, spec.n_heads * spec.head_dim)})
        if spec.qkv_bias or rows > spec.qkv_rows:
            shapes[p + "qkv.bias"] = (rows,)
        if spec.relu_mlp:
            shapes.update({p + "attn_norm.bias": (d,), p + "mlp_norm.bias": (d,), p + "o.bias": (d,),
                           p + "up.weight": (f, d), p + "up.bias": (f,), p + "down.weight": (f, d),
                           p + "down.bias": (d,)})
        else:
            shapes.update({p + "gate_up.weight": (2 * f, d), p + "down.weight": (d, f)})
    if manifest.get("weight_dtype") is not None:
        for name in fp8_weight_names([n[len("weights."):] for n in shapes
                                      if n.startswith("weights.")]):
            shapes["weight_scales." + name] = (shapes["weights." + name][0],)
    return shapes


def _digest(t: torch.Tensor) -> str:
    return xxhash.xxh3_64(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _read_checked(path: Path, manifest: dict[str, Any], device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """The container's tensors on `device`, each checked against the manifest's checksum (and,
    for a torch-backend engine, the tensor set and shapes its architecture needs). Hashing
    runs on worker threads (xxhash releases the GIL) while the next tensors load and move, so
    it costs little of the load time."""
    sums = manifest["checksums"]["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f, \
                ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            names = set(f.keys())
            if names != set(sums):
                odd = sorted(names ^ set(sums))
                raise PolarcError(f"{path} holds other tensors than its manifest lists "
                                  f"({', '.join(odd[:3])}{'...' if len(odd) > 3 else ''})",
                                  hint="rebuild it with polarc build")
            digests = {}
            for name in sorted(names):
                t = f.get_tensor(name)
                digests[name] = pool.submit(_digest, t)
                tensors[name] = t if name == "tokenizer.json" else t.to(device)
            for name, digest in digests.items():
                if digest.result() != sums[name]:
                    raise PolarcError(f"{path} is corrupt: tensor {name} does not match its "
                                      "checksum", hint="rebuild it with polarc build")
    except PolarcError:
        raise
    except Exception as exc:
        raise PolarcError(f"{path} is truncated or corrupt ({first_line(exc)})",
                          hint="rebuild it with polarc build") from None
    if manifest["backend"] == "torch":
        _check_shapes(path, manifest, tensors)
    return tensors


def _check_shapes(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    dtype = DTYPES[manifest["dtype"]]
    spec = ModelSpec(**manifest["spec"])
    want = expected_shapes(manifest)
    for layer in manifest["plan"]["mlp_k"]:
        p = f"routers.layers.{layer}.mlp."
        r = tensors.get(p + "w1", torch.empty(0, 0)).shape[0]
        want.update({p + "w1": (r, spec.hidden), p + "w2": (spec.intermediate, r),
                     p + "b2": (spec.intermediate,)})
    for name, t in tensors.items():
        if name == "tokenizer.json":
            continue
        shape = want.pop(name, None)
        if shape is None:
            raise PolarcError(f"{path} holds a tensor its architecture has no place for: {name}")
        if tuple(t.shape) != shape:
            raise PolarcError(f"{path}: tensor {name} has shape {tuple(t.shape)}, its "
                              f"architecture needs {shape}")
        want_dtype = dtype
        if "weight_scales." + name[len("weights."):] in tensors:
            want_dtype = FP8_WEIGHT_DTYPE
        if name.startswith("weights.") and t.dtype != want_dtype:
            raise PolarcError(f"{path}: tensor {name} is {t.dtype}, the manifest says "
                              f"{manifest['dtype']}")
    if want:
        raise PolarcError(f"{path} lacks tensors its architecture needs: "
                          f"{', '.join(sorted(want)[:3])}")


def _tokenizer(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: ModelSpec
               ) -> Tokenizer:
    tk = manifest["tokenizer"]
    if "tokenizer.json" not in tensors:
        return ByteTokenizer(spec.vocab)
    import tokenizers
    import transformers

    try:
        raw = bytes(tensors.pop("tokenizer.json").numpy().tobytes()).decode("utf-8")
        backend = tokenizers.Tokenizer.from_str(raw)
    except Exception as exc:
        raise PolarcError(f"the engine's tokenizer cannot be read ({first_line(exc)})") from None
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    if tk.get("chat_template"):
        fast.chat_template = tk["chat_template"]
    return HFTokenizer(fast, eos_id=tk["eos_id"], bos_id=tk["bos_id"])


def _head_routers(weights: dict[str, torch.Tensor], spec: ModelSpec, plan: dict,
                  compute: torch.dtype) -> dict[int, HeadRouter]:
    """Each layer's head router, from the rows appended to its qkv weight (module docstring);
    a float8 one widened, as its own calls read it in the compute dtype."""
    head, rows = {}, spec.qkv_rows
    for layer, k in enumerate(plan["k_per_layer"]):
        qkv_w, qkv_b = weights[f"layers.{layer}.qkv.weight"], weights.get(f"layers.{layer}.qkv.bias")
        if qkv_w.shape[0] > rows:
            router_w = qkv_w[rows:]
            if router_w.dtype == FP8_WEIGHT_DTYPE:
                scale = weights[f"layers.{layer}.qkv.weight_scale"][rows:, None]
                router_w = (router_w.float() * scale).to(compute)
            head[layer] = HeadRouter(weight=router_w, bias=qkv_b[rows:], k=k,
                                     recall=float("nan"))
    return head


def load_engine(path: Path, device: str | torch.device = "cpu",
                keep_fp8_weights: bool | None = None) -> Engine:
    """Load an engine file, every tensor checked against the manifest's checksums; a
    TensorRT-backend one comes back with its plans and no weights.

    FP8 weights stay float8, laid out tile by tile (`tile_fp8`; a gate_up's gate and up rows
    interleaved; no q/k/v or gate/up views into them), each with its row scales as
    ``<name>_scale`` (for ``layers.0.qkv.weight``: ``layers.0.qkv.weight_scale``), where
    `keep_fp8_weights` says so: by default on CUDA for SwiGLU models, whose runtime reads them
    through the FP8 linear kernel. Otherwise they are dequantized here, once, to the engine's
    dtype (the CPU path, and ReLU MLPs, whose selective GEMMs read rows of the weights in the
    compute dtype)."""
    manifest = read_manifest(path)
    trt = manifest["backend"] == "tensorrt"
    tensors = _read_checked(path, manifest, torch.device("cpu" if trt else device))
    spec = ModelSpec(**manifest["spec"])
    plan = manifest["plan"]
    identity = manifest["model"]["identity"]
    random_weights = manifest["model"]["random_weights"]
    tok = _tokenizer(manifest, tensors, spec)
    if trt:
        model = Model(spec=spec, weights={}, tokenizer=tok, identity=identity,
                      random_weights=random_weights)
        plans = {k.split(".", 1)[1]: tensors[k].numpy().tobytes() for k in tensors
                 if k.startswith("tensorrt.")}
        return Engine(path=path, manifest=manifest, model=model,
                      k_per_layer=list(plan["k_per_layer"]), head_routers={},
                      mlp_routers={}, plans=plans)
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    compute = DTYPES[manifest["dtype"]]
    if keep_fp8_weights is None:
        keep_fp8_weights = torch.device(device).type == "cuda" and not spec.relu_mlp
    for key in [k for k in tensors if k.startswith("weight_scales.")]:
        name, scale = key[len("weight_scales."):], tensors[key]
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise PolarcError(f"{path}: the FP8 weight scales of {name} are not all finite "
                              "and positive", hint="rebuild it with polarc build")
        if keep_fp8_weights:
            weights[name + "_scale"] = scale.float()
        else:
            weights[name] = (weights[name].float() * scale[:, None]).to(compute)
    weights["lm_head.weight"] = weights.get("lm_head.weight", weights["embed.weight"])
    if spec.relu_mlp:
        for layer in range(spec.n_layers):
            weights[f"layers.{layer}.down.weight"] = weights[f"layers.{layer}.down.weight"].T
    head = _head_routers(weights, spec, plan, compute)
    if keep_fp8_weights and not spec.relu_mlp:  # (a ReLU model's selective GEMMs read rows)
        tile_fp8_weights(weights)
    add_part_views(weights, spec)
    model = Model(spec=spec, weights=weights, tokenizer=tok, identity=identity,
                  random_weights=random_weights, rope_inv_freq=tensors.get("rope.inv_freq"),
                  rope_attention_scaling=float(manifest["rope_attention_scaling"]))
    mlp: dict[int, MLPRouter] = {}
    dtype = weights["embed.weight"].dtype
    for layer in range(spec.n_layers):
        key = f"routers.layers.{layer}.mlp"
        if key + ".w1" in tensors:
            mlp[layer] = MLPRouter(w1=tensors[key + ".w1"].to(dtype),
                                   w2=tensors[key + ".w2"].to(dtype),
                                   b2=tensors[key + ".b2"].to(dtype),
                                   k=int(plan["mlp_k"][str(layer)]), batch=0,
                                   union_recall=float("nan"), recall=float("nan"))
    scales = tensors.get("kv.scales")
    if scales is not None and not bool(torch.isfinite(scales).all() and (scales > 0).all()):
        raise PolarcError(f"{path}: its FP8 KV scales are not all finite and positive",
                          hint="rebuild it with polarc build")
    offset = tensors.get("kv.key_offset")
    if offset is not None and not bool(torch.isfinite(offset).all()):
        raise PolarcError(f"{path}: its FP8 key offsets are not all finite",
                          hint="rebuild it with polarc build")
    return Engine(path=path, manifest=manifest, model=model, k_per_layer=list(plan["k_per_layer"]),
                  head_routers=head, mlp_routers=mlp, kv_scales=scales, kv_key_offset=offset)
