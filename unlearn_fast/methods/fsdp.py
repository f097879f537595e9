"""Opt-in FSDP for the language-model methods (``TrainConfig.fsdp``, ``unlearn-fast run
--fsdp``), with torch's FSDP2 ``fully_shard`` (torch >= 2.6; CPU + gloo and CUDA + nccl).

What is sharded: every block of the backbone's layer lists (the language model's decoder
layers, the vision tower's encoder layers / Qwen2-VL's ``visual.blocks``), then the
backbone itself (``model.model``, the module the adapters call) as the root group, so the
embeddings, projector and final norm are sharded too.  The lm_head stays replicated: the
fused losses read its weight directly (never through a module forward, which is what
makes FSDP gather a group), so the trainer all-reduces its gradient as under DDP, while
FSDP reduce-scatters (averages) the sharded ones.  A separate frozen reference model (no
LoRA) is sharded the same way; with LoRA the reference is the same sharded module.

Supported: every language-model method (ga, ga_kl, graddiff, kl_min, npo, po, siu,
mmunlearner; MultiDelete is not sharded).
* MMUnlearner: the Fisher, the saliency mask and the masked / geometry gradient transform
  are elementwise, so they run on each rank's parameter shards (:func:`local`) and give
  exactly the slices of the single-process ones; the clipping norm is global
  (:func:`global_grad_norm`, passed to ``saliency.transform_gradients_(total_norm=)``);
  a top-fraction mask (``mask_fraction``) selects its k-th ratio over every rank's shard
  with ``saliency.topk_mask_distributed`` (the replicated lm_head counted once).
  The mask lives sharded in memory (it is not written to disk).
* Checkpoint/resume: the trainer writes the trainable weights and the optimiser state
  with torch.distributed.checkpoint (:func:`save_sharded` / :func:`load_sharded`: every
  rank writes its own shard file into ``checkpoint/sharded``; the folder must be on a
  file system every rank sees), its own small state (step, schedule, RNG, history) as
  without FSDP; temporary folder, barriers, rank-0 rename.
* After training nothing is gathered on every rank: the sharded model is evaluated as it
  is (``unlearn_fast.metrics`` pads every rank's share of the examples to the same count
  per modality, so the ranks' forwards, each a collective, match; greedy decoding runs
  in lockstep with transformers' ``synced_gpus``), and saving gathers the full state dict
  to rank 0's CPU memory only (:func:`full_state_on_rank0`,
  ``runner.save_unlearned_model``).

Limitation: every forward is a collective, so every rank must run the same modules.  The
training batches put image rows first before splitting them over the ranks, which holds
when a global batch has no image row or at least one per rank; a global batch with fewer
image rows than ranks (but some) would make the ranks disagree (raise the batch size).
"""
from __future__ import annotations

import inspect
from typing import Dict, Iterable, List, Optional

import torch


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(t) -> bool:
    return isinstance(t, _dtensor_cls())


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"FSDP mode needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                           f"{torch.__version__}") from exc
    return fully_shard


ENCODER_METHODS = ("get_image_features", "get_video_features")


def _layer_lists(module: torch.nn.Module) -> List[torch.nn.ModuleList]:
    return [m for name, m in module.named_modules()
            if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks") and len(m)]


def shard_model(model, adapter) -> List[str]:
    """``fully_shard`` the backbone's blocks and the backbone (in place); returns the
    names of the sharded groups.  Needs an initialised process group."""
    from unlearn_fast.models.adapters import unwrap

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("FSDP mode needs torch.distributed initialised (run under torchrun / accelerate launch)")
    fully_shard = _fully_shard()
    backbone = adapter.base_model(model)
    head, _ = adapter.lm_head(model)
    if any(p is head for p in backbone.parameters()):
        raise ValueError(f"FSDP mode: {adapter.model_class} ties its lm_head to the input embeddings; tied heads are "
                         f"not supported (the head stays replicated while the embeddings are sharded)")
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    groups = []
    for layers in _layer_lists(backbone):
        for block in layers:
            fully_shard(block)
            groups.append(names.get(id(block), "?"))
    fully_shard(backbone)
    groups.append(names.get(id(backbone), "?"))
    # transformers' generate (5.x) runs the vision encoder through these methods of the
    # backbone, not through its forward: make them gather the root group's weights too
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in ENCODER_METHODS:
        if callable(getattr(backbone, method, None)):
            register_fsdp_forward_method(backbone, method)
            # generate picks the keyword arguments by the method's signature; the patched
            # bound method would report the original's minus its first argument
            getattr(backbone, method).__func__.__signature__ = inspect.signature(getattr(type(backbone), method))
    return groups


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor (a view: writes reach the DTensor);
    a plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def global_grad_norm(grads: Iterable[Optional[torch.Tensor]]) -> float:
    """The 2-norm of the whole gradient over a mix of sharded (DTensor: this rank's shard,
    squared sums all-reduced) and replicated tensors (identical on every rank after the
    trainer's all-reduce: counted once).  A collective when a process group exists."""
    grads = [g.detach() for g in grads if g is not None]
    dev = grads[0].device if grads and grads[0].device.type == "cuda" else torch.device("cpu")
    sharded = _sum_of_squares([g.to_local() for g in grads if is_sharded(g)], dev)
    plain = _sum_of_squares([g for g in grads if not is_sharded(g)], dev)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sharded)
    return float((sharded + plain).sqrt())  # the one host sync


def _sum_of_squares(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the squared entries of ``tensors`` as a float64 scalar on ``device``: one
    foreach norm pass (norms in float64 whatever the dtype), no host sync."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.stack([n.to(device) for n in norms]).square().sum()


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """torch's ``clip_grad_norm_`` (2-norm, coefficient max_norm / (norm + 1e-6) capped at
    1) over a mix of sharded (DTensor) and replicated gradients; returns the total norm."""
    params = [p for p in params if p.grad is not None]
    total = global_grad_norm([p.grad for p in params])
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_([local(p.grad) for p in params], coef)
    return total


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the frozen weights (LoRA's base, the frozen vision tower) are the input model's:
    # a checkpoint holds what training changes, as the non-FSDP one does
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(model, optimizer, path: str) -> None:
    """Write the trainable weights and the optimiser state with torch.distributed.checkpoint:
    every rank writes its own shards into the folder ``path`` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options())
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)


def load_sharded(model, optimizer, path: str) -> None:
    """Load what :func:`save_sharded` wrote (the same sharding layout is not required:
    DCP reshards) into ``model`` and ``optimizer`` in place (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_dict_options(strict=False))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def full_state_on_rank0(model) -> Dict[str, torch.Tensor]:
    """The full ``state_dict`` of a sharded model, gathered to rank 0's CPU memory only
    (a collective: every rank calls it; the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(template, state: Dict[str, torch.Tensor]):
    """A plain (unsharded) copy of ``template``'s architecture holding ``state``."""
    import copy

    plain = copy.deepcopy(template)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"FSDP: the gathered weights do not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return plain


def check_supported(method_name: str, cfg) -> Optional[str]:
    """Why FSDP mode cannot run this configuration (None when it can)."""
    return None
