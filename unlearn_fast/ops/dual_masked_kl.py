"""SIU's Dual Masked KL divergence (Li et al., NeurIPS 2024), fused.

    L_DMK = (1/Z) * sum_t K_S(t) * sum_v K_V(v) * p_t(v) * (log p_t(v) - log q_t(v))

p = softmax(teacher / T) (a constant: no gradient flows to the teacher), q =
softmax(student / T).  The masks apply after the softmax, without renormalisation.
The gradient with respect to a student logit z_j at a kept position is

    K_S * (q_j * S - K_V(j) * p_j) / T,   S = sum_v K_V(v) p(v),

the same for ``form="kl"`` and ``form="cross_entropy"`` (they differ by the teacher's
masked entropy, a constant).  Fused backends compute it in float32 whatever the input
dtype and never allocate anything of size tokens x vocab besides the gradient itself.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from unlearn_fast import backends
from unlearn_fast.ops import _validation as V
from unlearn_fast.ops._common import KernelPair, cpu_ops, cuda_ops, reduce_rows, register_first_order_autograd

OP = "dual_masked_kl"
FORMS = ("kl", "cross_entropy")
DMK_REDUCTIONS = ("none", "sum", "mean", "siu")
# Backends with a float64 kernel (the others compute in float32 and take fp32/bf16/fp16).
FLOAT64_BACKENDS = ("eager", "cpp")
# Row statistics a fused forward saves for backward (float32 (N, 5); float64 for float64 logits):
#   max(s/T), log sum exp(s/T - max), max(t/T), log sum exp(t/T - max), S = sum K_V p.
# Maxima and log-sums are kept apart because an fp32 lse of logits near 1e4 is off by
# up to 5e-4, an error every recomputed probability would inherit.
STATS_PER_ROW = 5


# --------------------------------------------------------------------------------------
# Eager reference: the SIU formulation (softmax, mask, log, multiply, sum).  It is the
# "eager" backend, the benchmark baseline, and (in float64) the test oracle.
# --------------------------------------------------------------------------------------
def reference_rows(student: torch.Tensor, teacher: torch.Tensor, token_mask: Optional[torch.Tensor],
                   vocab_mask: Optional[torch.Tensor], inv_temperature: float, cross_entropy: bool) -> torch.Tensor:
    """Per-row masked KL / CE of (N, V) logits, 0 at masked rows, as float32 (float64 for float64 input)."""
    a = student * inv_temperature
    b = teacher.detach() * inv_temperature
    p = torch.softmax(b, dim=-1)
    log_q = torch.log_softmax(a, dim=-1)
    weighted_p = p * vocab_mask.to(p.dtype) if vocab_mask is not None else p
    if cross_entropy:
        rows = -(weighted_p * log_q).sum(-1)
    else:
        # xlogy: a teacher -inf logit (p = 0) adds 0 log 0 = 0, as in the kernels, not NaN
        rows = (torch.xlogy(weighted_p, p) - weighted_p * log_q).sum(-1)
    if token_mask is not None:
        rows = rows * token_mask.to(rows.dtype)
    return rows if rows.dtype == torch.float64 else rows.float()


# --------------------------------------------------------------------------------------
# The custom op: one entry for every fused backend (the backend name is an argument),
# with a fake kernel for torch.compile and an autograd formula that recomputes p and q
# in backward from five saved floats per row.
# --------------------------------------------------------------------------------------
@torch.library.custom_op("unlearn_fast::dual_masked_kl_fwd", mutates_args=())
def _dmk_fwd(student: torch.Tensor, teacher: torch.Tensor, token_mask: Optional[torch.Tensor],
             vocab_mask: Optional[torch.Tensor], inv_temperature: float, cross_entropy: bool,
             backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    impl = backends.implementations(OP)[backend]
    return impl.forward(student, teacher, token_mask, vocab_mask, inv_temperature, cross_entropy)


def _accumulator_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the fused kernels' rows and statistics: float64 for float64 logits, else float32."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


@_dmk_fwd.register_fake
def _(student, teacher, token_mask, vocab_mask, inv_temperature, cross_entropy, backend):
    n, acc = student.shape[0], _accumulator_dtype(student.dtype)
    return student.new_empty((n,), dtype=acc), student.new_empty((n, STATS_PER_ROW), dtype=acc)


@torch.library.custom_op("unlearn_fast::dual_masked_kl_bwd", mutates_args=())
def _dmk_bwd(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
             token_mask: Optional[torch.Tensor], vocab_mask: Optional[torch.Tensor], stats: torch.Tensor,
             inv_temperature: float, backend: str) -> torch.Tensor:
    impl = backends.implementations(OP)[backend]
    return impl.backward(grad_rows, student, teacher, token_mask, vocab_mask, stats, inv_temperature)


@_dmk_bwd.register_fake
def _(grad_rows, student, teacher, token_mask, vocab_mask, stats, inv_temperature, backend):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, token_mask, vocab_mask, inv_temperature, _cross_entropy, backend = inputs
    ctx.save_for_backward(student, teacher, token_mask, vocab_mask, output[1])
    ctx.inv_temperature = inv_temperature
    ctx.backend = backend


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, token_mask, vocab_mask, stats = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    grad_rows = grad_loss.to(stats.dtype).contiguous()
    grad = _dmk_bwd(grad_rows, student, teacher, token_mask, vocab_mask, stats, ctx.inv_temperature, ctx.backend)
    return grad, None, None, None, None, None, None


register_first_order_autograd(_dmk_fwd, _backward, _setup_context)


# Backend registrations.  The eager backend is not a kernel pair: it runs
# reference_rows under ordinary autograd (see dual_masked_kl below).
backends.register(OP, "eager")(reference_rows)
backends.register(OP, "cpp")(KernelPair(
    forward=lambda *a: cpu_ops().dual_masked_kl_fwd(*a),
    backward=lambda *a: cpu_ops().dual_masked_kl_bwd(*a),
))
backends.register(OP, "cuda")(KernelPair(
    forward=lambda *a: cuda_ops().dual_masked_kl_fwd(*a),
    backward=lambda *a: cuda_ops().dual_masked_kl_bwd(*a),
))


def _triton():
    from unlearn_fast.triton import dual_masked_kl as mod  # imported lazily: triton is optional

    return mod


backends.register(OP, "triton")(KernelPair(
    forward=lambda *a: _triton().forward(*a),
    backward=lambda *a: _triton().backward(*a),
))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
_FLOAT64_FALLBACK_WARNED: set = set()


def _backend_for(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: ``backends.resolve`` plus the float64 rule.

    float64 logits run on a backend with a float64 kernel (FLOAT64_BACKENDS: eager, cpp).
    An explicit backend without one raises TypeError; "auto" keeps its choice when it has
    one (cpp on the CPU) and otherwise runs eager, warning once per device."""
    name = backends.resolve(OP, backend, device)
    if dtype != torch.float64 or name in FLOAT64_BACKENDS:
        return name
    if backend != "auto":
        raise TypeError(f"student_logits: float64 logits run on the {' or '.join(FLOAT64_BACKENDS)} backends; "
                        f"the {name!r} kernels take float32/bfloat16/float16")
    if device.type not in _FLOAT64_FALLBACK_WARNED:
        _FLOAT64_FALLBACK_WARNED.add(device.type)
        warnings.warn(f"unlearn_fast: dual_masked_kl on float64 {device.type} logits runs on the eager backend "
                      f"(the {name!r} kernels have no float64 path)", RuntimeWarning, stacklevel=3)
    return "eager"


def build_vocab_mask(vocab_size: int, vocab_mask: Optional[torch.Tensor] = None,
                     forget_token_ids: Union[None, Sequence[int], torch.Tensor] = None,
                     device: Union[str, torch.device, None] = None) -> Optional[torch.Tensor]:
    """K_V as a float32 (V,) tensor: ``vocab_mask`` (True = contributes) with the
    ``forget_token_ids`` set to 0.  Returns None when neither is given (K_V = 1).

    Build it once and pass it as ``vocab_mask`` in a training loop: checking
    ``forget_token_ids`` against the vocabulary size reads them on the host.
    """
    device = torch.device(device) if device is not None else (
        vocab_mask.device if isinstance(vocab_mask, torch.Tensor) else torch.device("cpu"))
    kv = None
    if vocab_mask is not None:
        kv = V.mask_as_float(vocab_mask, "vocab_mask", (vocab_size,), device)
    if forget_token_ids is not None:
        ids = V.index_tensor(forget_token_ids, "forget_token_ids", vocab_size, device)
        kv = torch.ones(vocab_size, dtype=torch.float32, device=device) if kv is None else kv.clone()
        kv[ids] = 0.0
    return kv


def dual_masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   token_mask: Optional[torch.Tensor] = None, vocab_mask: Optional[torch.Tensor] = None, *,
                   forget_token_ids: Union[None, Sequence[int], torch.Tensor] = None, form: str = "kl",
                   reduction: str = "mean", temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """SIU's Dual Masked KL divergence between teacher and student logits.

    Args:
        student_logits: (..., V) float32/bfloat16/float16/float64 logits of the model being
            unlearned.  The only input that receives a gradient.
        teacher_logits: (..., V) logits of the frozen original model, same shape, dtype and
            device.  Treated as a constant (no gradient).
        token_mask: (...) K_S — True/1 where the position contributes, False/0 at the
            target-phrase tokens (and padding).  None: every position contributes.
        vocab_mask: (V,) K_V — True/1 where the vocabulary entry contributes, False/0 at
            the concept name's token ids.  None: every entry contributes.
        forget_token_ids: token ids whose K_V is set to 0 (combined with ``vocab_mask``).
        form: "kl" -> sum_v K_V p (log p - log q);  "cross_entropy" -> -sum_v K_V p log q
            (SIU's reference code; same gradient, differs by the teacher's masked entropy).
        reduction: "none" -> per position, shape (...), 0 at masked positions;
            "sum" -> sum over positions;  "mean" -> sum / number of kept positions (0 when
            none are kept);  "siu" -> sum / (kept positions x V), the reference code's Z.
        temperature: T > 0 divides both logits.
        backend: "auto" (fastest available for the device), "eager", "cpp", "triton" or
            "cuda".  See ``unlearn-fast info``.  float64 logits run on "eager" or "cpp"
            (a double kernel); "auto" picks cpp on the CPU and eager on CUDA for them.

    Returns:
        A float32 tensor (float64 for float64 logits), accumulated in float32 by the fused
        backends for fp32/bf16/fp16 input (in float64 for float64 input).  Masks are
        applied after the softmax; p and q are not renormalised.
    """
    V.check_tensor(student_logits, "student_logits", floating=True)
    V.check_tensor(teacher_logits, "teacher_logits", floating=True)
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have shape (..., V) with V >= 1, got {tuple(student_logits.shape)}")
    V.check_same(student_logits, teacher_logits, "student_logits", "teacher_logits")
    V.check_choice(form, "form", FORMS)
    V.check_choice(reduction, "reduction", DMK_REDUCTIONS)
    inv_temperature = 1.0 / V.check_positive(temperature, "temperature")

    device = student_logits.device
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    ks = V.mask_as_float(token_mask, "token_mask", lead_shape, device).reshape(-1) if token_mask is not None else None
    kv = build_vocab_mask(vocab, vocab_mask, forget_token_ids, device)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    cross_entropy = form == "cross_entropy"

    name = _backend_for(backend, device, student.dtype)
    if name == "eager":
        rows = reference_rows(student, teacher, ks, kv, inv_temperature, cross_entropy)
    else:
        rows, _stats = _dmk_fwd(student.contiguous(), teacher.detach().contiguous(), ks, kv,
                                inv_temperature, cross_entropy, name)
    return reduce_rows(rows, ks, reduction, lead_shape, siu_denominator_scale=vocab)


class DualMaskedKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`dual_masked_kl` (same options).

    Example::

        loss_fn = DualMaskedKLDivLoss(forget_token_ids=name_ids, reduction="mean")
        loss = ce + loss_fn(student_logits, teacher_logits, token_mask=~target_phrase)
    """

    def __init__(self, *, forget_token_ids=None, vocab_mask: Optional[torch.Tensor] = None, form: str = "kl",
                 reduction: str = "mean", temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        V.check_choice(form, "form", FORMS)
        V.check_choice(reduction, "reduction", DMK_REDUCTIONS)
        V.check_positive(temperature, "temperature")
        self.forget_token_ids = forget_token_ids
        self.vocab_mask = vocab_mask
        self.form, self.reduction, self.temperature, self.backend = form, reduction, temperature, backend

    def forward(self, student_logits, teacher_logits, token_mask=None, vocab_mask=None):
        return dual_masked_kl(student_logits, teacher_logits, token_mask,
                              vocab_mask if vocab_mask is not None else self.vocab_mask,
                              forget_token_ids=self.forget_token_ids, form=self.form, reduction=self.reduction,
                              temperature=self.temperature, backend=self.backend)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, reduction={self.reduction!r}, temperature={self.temperature}, backend={self.backend!r}"
