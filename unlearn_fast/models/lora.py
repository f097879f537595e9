"""LoRA through peft, and the frozen reference model.

With LoRA the reference (the original model) is the same module with its adapters
disabled: no second copy of any weight exists.  Without LoRA the reference is a frozen
deep copy (the only way to keep the original weights while all of them train).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, List, Optional

import torch

from unlearn_fast.models.adapters import _is_peft, get_adapter, unwrap

LANGUAGE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_modules(model, where: str = "language") -> List[str]:
    """Names of the nn.Linear modules LoRA wraps: "language" (the LLM's attention and
    MLP projections), "vision" (the vision tower + projector linears) or "all"."""
    if where not in ("language", "vision", "all"):
        raise ValueError(f"where must be 'language', 'vision' or 'all', got {where!r}")
    adapter = get_adapter(model)
    names = []
    for name, mod in unwrap(model).named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        vision = adapter.is_vision_parameter(name + ".weight")
        if where == "all" or (where == "vision" and vision) or \
                (where == "language" and not vision and name.rsplit(".", 1)[-1] in LANGUAGE_LINEARS):
            names.append(name)
    if not names:
        raise ValueError(f"no linear layers to put LoRA on ({where!r}) in {type(unwrap(model)).__name__}")
    return names


def apply_lora(model, r: int = 8, alpha: Optional[int] = None, where: str = "language", dropout: float = 0.0):
    """Wrap ``model`` with peft LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    if _is_peft(model):
        raise ValueError("the model already has peft adapters")
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                     target_modules=lora_target_modules(model, where), bias="none")
    with quiet_peft_wrapping():
        return get_peft_model(model, cfg)


@contextlib.contextmanager
def quiet_peft_wrapping():
    """Wrapping a model in peft adapters (get_peft_model, PeftModel.from_pretrained) reads
    transformers' deprecated ``is_gradient_checkpointing``; that FutureWarning is about
    peft's code, not the caller's, and would print on every run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


class Reference:
    """The frozen original model for KL / NPO terms.

    ``with ref.active() as m:`` yields a module computing the original model: the LoRA
    model with adapters disabled (``shared`` is True, no copy), or a frozen deep copy.
    """

    def __init__(self, model):
        self.shared = _is_peft(model)
        if self.shared:
            self.model = model
        else:
            self.model = copy.deepcopy(model)
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            if self.shared:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model


def merged_copy(model):
    """A plain transformers model with LoRA merged in (for saving); the input is untouched."""
    if not _is_peft(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
