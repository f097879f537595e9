"""Import every op module (each registers its backends on import)."""
import importlib

OP_MODULES = (
    "unlearn_fast.ops.dual_masked_kl",
    "unlearn_fast.ops.token_stats",
    "unlearn_fast.ops.fused_linear",
    "unlearn_fast.ops.saliency",
    "unlearn_fast.ops.modality",
)

for _name in OP_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as _exc:  # an op module not written yet
        if _exc.name != _name:
            raise
