"""Unlearning methods end to end: SIU, MMUnlearner, MultiDelete and the GA / NPO family
(:mod:`.methods`, :mod:`.multidelete`) on one training loop (:mod:`.trainer`), built and
run by :mod:`.runner`; ``unlearn-fast run`` is :mod:`.cli`."""
from unlearn_fast.methods.lm import LMContext
from unlearn_fast.methods.methods import LM_METHODS, SIU_PRESETS, MethodData
from unlearn_fast.methods.runner import ALL_METHODS, build_lm_method, run_lm_method
from unlearn_fast.methods.trainer import BatchStream, TrainConfig, Trainer

__all__ = ["ALL_METHODS", "LM_METHODS", "SIU_PRESETS", "LMContext", "MethodData", "Trainer", "TrainConfig",
           "BatchStream", "build_lm_method", "run_lm_method", "run_multidelete"]


def __getattr__(name):
    if name == "run_multidelete":
        from unlearn_fast.methods.multidelete import run_multidelete

        return run_multidelete
    raise AttributeError(name)
