"""Shared test helpers (import as ``from helpers import ...``; tests/ is on sys.path)."""
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (absolute norm when ref is 0)."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def cpu_backends_for(op: str):
    """Fast backends that can run ``op`` on CPU tensors here (cpp; triton under the interpreter)."""
    from unlearn_fast import backends
    import unlearn_fast.ops.registry_all  # noqa: F401

    out = []
    for name in ("cpp", "triton"):
        try:
            backends.resolve(op, name, "cpu")
            out.append(name)
        except Exception:
            pass
    return out
