"""Collection, one layer at a time: the calibration sequences' hidden states pass through
layer i together; that layer's router inputs and labels are kept for a random subset of
token positions and handed to `on_layer` (which trains its routers) before layer i + 1 runs.
Memory holds the sequences' hidden states and one layer's samples, never every layer's.

`max_samples` bounds the kept positions whatever `--tokens` is: each batch keeps the same
random fraction of its positions (max_samples / calibration tokens), the same positions at
every layer, so the kept set is a uniform subsample of all calibration tokens.

Memory: each layer's weights are loaded once (`Model.layer_weights`); the hidden states,
tokens x hidden x element size (65,536 tokens of Llama-3-8B in bf16: 0.5 GiB), stay on the GPU
when they take at most a quarter of its free memory, else in pinned host memory, moved to
the GPU one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.progress import Progress

from polarc.errors import PolarcError
from polarc.models.forward import LayerObservation, run_layer
from polarc.models.layers import embed, rope_cos_sin
from polarc.models.load import Model
from polarc.models.memory import free_memory
from polarc.models.weights import layer_bytes


@dataclass
class LayerSamples:
    """One layer's kept token positions."""

    layer: int
    attn_in: torch.Tensor  # [n, d] router input, float32
    group_norms: torch.Tensor  # [n, Hkv] label source: norm of each group's part of the attention output
    mlp_active: torch.Tensor | None  # [n, N] bool, ReLU models only
    mlp_in: torch.Tensor | None  # [n, d] MLP router input, ReLU models only
    domain: torch.Tensor | None = None  # [n] int: index of each position's domain
    kv_absmax: torch.Tensor | None = None  # [2, Hkv]: largest |K|, |V| per group, every token
    key_mean: torch.Tensor | None = None  # [Hkv, D] float32: mean K per group, every token


def collect_layers(
    model: Model,
    seqs: torch.Tensor,
    on_layer: Callable[[LayerSamples], None],
    *,
    batch_size: int = 8,
    max_samples: int = 32768,
    seed: int = 0,
    row_domain: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> int:
    """Run `seqs` [n, T] through the dense model layer by layer, calling `on_layer` with each
    layer's subsampled observations (with each position's domain, from `row_domain` [n], when
    given); returns the positions kept per layer."""
    gen = torch.Generator().manual_seed(seed)
    keep_frac = min(1.0, max_samples / seqs.numel())
    device = model.device
    batches = [b.to(device) for b in seqs.split(batch_size)]
    home = hidden_home(seqs.numel() * model.spec.hidden * model.weights["embed.weight"]
                       .element_size(), device)
    picked = [torch.nonzero(torch.rand(b.numel(), generator=gen) < keep_frac).squeeze(1)
              .to(device) for b in batches]
    sample_domain = None if row_domain is None else torch.cat([
        row_domain[i * batch_size + p.cpu() // seqs.shape[1]] for i, p in enumerate(picked)])
    positions = torch.arange(seqs.shape[1], device=device)
    with torch.no_grad():
        hidden = [embed(model, b, positions) for b in batches]
    if home != device:
        hidden = [h.cpu().pin_memory() for h in hidden]
    rope = rope_cos_sin(model, positions, model.dtype)
    task = progress.add_task("collect + train", total=model.spec.n_layers) if progress else None
    for layer in range(model.spec.n_layers):
        parts: dict[str, list[torch.Tensor]] = {"x": [], "norms": [], "active": [], "mlp_in": [],
                                                "kv": [], "key_sum": []}
        with model.layer_weights(layer):  # once per layer, for every batch
            for i in range(len(batches)):
                out = run_layer(model, layer, hidden[i].to(device, non_blocking=True), rope,
                                observe=_keeper(parts, picked[i]))
                if home == device:
                    hidden[i] = out
                else:
                    hidden[i].copy_(out, non_blocking=True)
        on_layer(LayerSamples(layer, torch.cat(parts["x"]), torch.cat(parts["norms"]),
                              torch.cat(parts["active"]) if parts["active"] else None,
                              torch.cat(parts["mlp_in"]) if parts["mlp_in"] else None,
                              sample_domain,
                              torch.stack(parts["kv"]).amax(0).cpu() if parts["kv"] else None,
                              (torch.stack(parts["key_sum"]).sum(0) / seqs.numel()).float().cpu()
                              if parts["key_sum"] else None))
        if progress is not None:
            progress.advance(task)
    return int(sum(len(p) for p in picked))


def _keeper(parts: dict[str, list[torch.Tensor]], keep: torch.Tensor
            ) -> Callable[[LayerObservation], None]:
    """An observer appending the observations at the positions `keep` to `parts`."""

    def observe(obs: LayerObservation) -> None:
        d = obs.attn_in.shape[-1]
        parts["x"].append(obs.attn_in.reshape(-1, d)[keep].float())
        parts["norms"].append(obs.group_norms.reshape(-1, obs.group_norms.shape[-1])[keep])
        if obs.kv_absmax is not None:
            parts["kv"].append(obs.kv_absmax)
            parts["key_sum"].append(obs.key_sum)
        if obs.mlp_active is not None:
            parts["active"].append(obs.mlp_active.reshape(-1, obs.mlp_active.shape[-1])[keep])
            parts["mlp_in"].append(obs.mlp_in.reshape(-1, d)[keep].float())

    return observe


def hidden_home(nbytes: int, device: torch.device) -> torch.device:
    """Where the calibration's hidden states live: the GPU when they take at most a quarter
    of its free memory, else (pinned) host memory."""
    if device.type != "cuda" or nbytes <= free_memory(device) // 4:
        return device
    return torch.device("cpu")


def layer_work_bytes(model: Model, batch_size: int, seq_len: int) -> int:
    """GPU memory one batch of one layer needs beyond what is already resident: the layer's
    weights (when streamed) and its activations, the widest of them (the MLP's gate, up and
    product, the q/k/v projections) counted twice for temporaries, plus the fp32 copies the
    observers keep."""
    spec = model.spec
    elem = torch.empty((), dtype=model.dtype).element_size()
    width = (3 * spec.intermediate + (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim
             + spec.n_heads * spec.head_dim + 4 * spec.hidden)
    per_seq = seq_len * (2 * width * elem + 2 * spec.hidden * 4)
    weights = 0 if model.resident_layers >= spec.n_layers else layer_bytes(spec, model.dtype)
    return weights + batch_size * per_seq


def check_gpu_room(model: Model, batch_size: int, seq_len: int, free: int | None = None) -> None:
    """Refuse, before any work, a --batch-size whose one layer cannot run in the GPU's free
    memory (`free`, default: the model's GPU's; nothing to check on a CPU), naming the
    largest that would."""
    if free is None:
        if model.device.type != "cuda":
            return
        free = free_memory(model.device)
    need = layer_work_bytes(model, batch_size, seq_len)
    if need <= free:
        return
    fixed = layer_work_bytes(model, 0, seq_len)
    per_batch = layer_work_bytes(model, 1, seq_len) - fixed
    fits = max(0, (free - fixed) // per_batch)
    hint = (f"--batch-size {fits} would fit" if fits else
            f"even one sequence of {seq_len} tokens does not fit: a smaller --seq-len or a "
            "GPU with more memory")
    raise PolarcError(f"not enough GPU memory for one layer of {model.spec.name} at --batch-size "
                      f"{batch_size} x --seq-len {seq_len}: needs about {need / 2**30:.1f} GiB, "
                      f"{free / 2**30:.1f} GiB free", hint=hint)
