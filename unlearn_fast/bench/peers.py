"""Peer kernels as benchmark providers, on the closest equivalent computation.

  liger_kl    Liger-Kernel's LigerKLDIVLoss(log_target=True, reduction="batchmean") on
              log_softmax of the student and teacher logits: KL(p || q) without SIU's
              token and vocabulary masks (the log-softmaxes are materialised, as a user of
              it would).                                         -> dmk suite, dual_masked_kl
  liger_jsd   Liger-Kernel's LigerJSD on the same log-softmaxes, beta=0 (forward KL(p||q))
              where the installed version allows it, else beta=0.5 (the provider name then
              says ``liger_jsd_b0.5``: a different divergence, same memory traffic).
                                                                  -> dmk suite, dual_masked_kl
  liger_flce  Liger-Kernel's LigerFusedLinearCrossEntropyLoss(ignore_index=-100, mean).
                                                                  -> linear suite, cross_entropy
  cce         Apple's cut-cross-entropy ``linear_cross_entropy`` (ignore_index=-100, mean).
                                                                  -> linear suite, cross_entropy

They run only on CUDA and only when their package is installed; ``peer_status(device)``
says for each peer whether it can run and, if not, why; a missing or broken package
never stops a run (the suites catch a failing provider and go on).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Peer:
    name: str  # provider name in the rows
    module: str  # import name
    pip: str  # what to pip install
    ops: Tuple[str, ...]  # bench ops (rows' ``op``) it is a provider for


PEERS = (
    Peer("liger_kl", "liger_kernel", "liger-kernel", ("dual_masked_kl",)),
    Peer("liger_jsd", "liger_kernel", "liger-kernel", ("dual_masked_kl",)),
    Peer("liger_flce", "liger_kernel", "liger-kernel", ("cross_entropy",)),
    Peer("cce", "cut_cross_entropy", "cut-cross-entropy", ("cross_entropy",)),
)
_BY_NAME = {p.name: p for p in PEERS}


def why_unavailable(peer: Peer, device: str) -> Optional[str]:
    """None when ``peer`` can run on ``device``, else the reason(s)."""
    reasons = []
    if importlib.util.find_spec(peer.module) is None:
        reasons.append(f"{peer.module} not installed (pip install {peer.pip})")
    if not str(device).startswith("cuda"):
        reasons.append(f"needs a CUDA device (this run: {device})")
    if not reasons:
        try:
            importlib.import_module(peer.module)
        except Exception as exc:  # a broken install must not stop a benchmark run
            reasons.append(f"import {peer.module} failed: {type(exc).__name__}: {exc}")
    return "; ".join(reasons) or None


def peer_status(device: str) -> Dict[str, Optional[str]]:
    """Every peer -> None (it runs here) or why it does not."""
    return {p.name: why_unavailable(p, device) for p in PEERS}


def report(device: str, print_fn: Callable[[str], None] = print) -> None:
    """One line per peer: available, or absent and why (once per bench run)."""
    for name, why in peer_status(device).items():
        print_fn(f"  peer {name}: {'available' if why is None else 'absent: ' + why}")


def bench_peers(args, op: str, device: str) -> List[str]:
    """Peers that run ``op`` here, filtered by ``--backends`` like the other providers."""
    wanted = args.backends.split(",") if getattr(args, "backends", None) else None
    out = []
    for p in PEERS:
        if op in p.ops and why_unavailable(p, device) is None and (wanted is None or p.name in wanted):
            out.append(p.name)
    return out


def is_peer(provider: str) -> bool:
    return provider in _BY_NAME or provider.startswith("liger_jsd")


# --------------------------------------------------------------------------- wrappers
def kl_loss_fn(name: str) -> Tuple[str, Callable]:
    """(provider name, fn(student_logits, teacher_logits) -> loss) for a KL peer."""
    import torch

    if name == "liger_kl":
        from liger_kernel.transformers import LigerKLDIVLoss

        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return name, lambda s, t: loss(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    if name == "liger_jsd":
        from liger_kernel.transformers import LigerJSD

        try:
            loss, label = LigerJSD(beta=0.0), "liger_jsd"  # forward KL in versions that allow it
        except (AssertionError, ValueError):
            loss, label = LigerJSD(beta=0.5), "liger_jsd_b0.5"
        return label, lambda s, t: loss(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    raise ValueError(f"unknown KL peer {name!r}")


def linear_ce_fn(name: str) -> Callable:
    """fn(hidden, weight, targets) -> mean CE over targets != -100, for a linear-CE peer."""
    if name == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        return lambda h, w, y: loss(w, h, y)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100, reduction="mean")
    raise ValueError(f"unknown linear-CE peer {name!r}")
