"""FSDP checkpoint/resume (trainer.save_checkpoint / try_resume with
torch.distributed.checkpoint): a 2-process FSDP run interrupted right after its step-2
checkpoint and resumed ends with the same weights and losses as an uninterrupted
2-process FSDP run; an interrupted save (between its renames) resumes from the previous
checkpoint."""
import pytest
import torch

from helpers import run_on_gloo_ranks

pytestmark = pytest.mark.distributed

# a cosine schedule and AdamW: the resumed run needs the scheduler and optimiser state
KW = dict(overrides={"steps": 4, "batch_size": 4, "lr": 1e-2, "schedule": "cosine"}, progress=False)


class Interrupted(Exception):
    pass


def _run(out_dir, checkpoint_every=0):
    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.fsdp import full_state_on_rank0
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()
    res = run_lm_method("ga_kl", tiny_llava(), tok, task, "seven", fsdp=True, out_dir=out_dir,
                        checkpoint_every=checkpoint_every, **KW)
    state = full_state_on_rank0(res.model) if res.sharded else res.model.state_dict()  # rank 0 only
    return {"state": {k: v.detach().clone() for k, v in state.items()},
            "losses": [h[k] for h in res.history for k in ("forget_ce", "retain_kl", "grad_norm", "lr")],
            "resumed_from": res.resumed_from}


def _on_rank(rank, run_dir):
    import os

    from unlearn_fast.methods.trainer import Trainer

    original_save = Trainer.save_checkpoint

    def save_then_die(self):  # "killed" right after the step-2 checkpoint is in place
        original_save(self)
        raise Interrupted(self.step)

    Trainer.save_checkpoint = save_then_die
    try:
        _run(run_dir, checkpoint_every=2)
        raise AssertionError("the run was not interrupted")
    except Interrupted as stop:
        at = stop.args[0]
    finally:
        Trainer.save_checkpoint = original_save
    files = sorted(os.listdir(os.path.join(run_dir, "checkpoint", "sharded")))
    resumed = _run(run_dir, checkpoint_every=2)
    straight = _run(None)
    return {"interrupted_at": at, "files": files, "resumed": resumed, "straight": straight}


def test_fsdp_resume_equals_uninterrupted(tmp_path):
    got = run_on_gloo_ranks(_on_rank, tmp_path, str(tmp_path / "run"))
    assert got["interrupted_at"] == 2
    assert sum(f.endswith(".distcp") for f in got["files"]) == 2  # one shard file per rank
    resumed, straight = got["resumed"], got["straight"]
    assert resumed["resumed_from"] == 2 and straight["resumed_from"] == 0
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-6, abs=1e-9)
    for name, w in straight["state"].items():
        if name.endswith("k_proj.bias"):
            continue  # zero gradient in exact arithmetic: AdamW amplifies rounding noise (test_fsdp_run)
        torch.testing.assert_close(resumed["state"][name], w, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    base = __import__("tiny_models").tiny_llava().state_dict()
    assert sum(int(not torch.equal(base[n], w)) for n, w in straight["state"].items()) > 0  # it trained


def test_interrupted_save_resumes_from_the_previous_checkpoint(tmp_path):
    """A save killed between moving the old checkpoint aside and renaming the new one in
    leaves checkpoint.old: the trainer resumes from it (single process)."""
    import os

    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()
    kw = dict(overrides={"steps": 3, "batch_size": 4, "lr": 1e-2}, progress=False, out_dir=str(tmp_path),
              checkpoint_every=2)
    run_lm_method("ga", tiny_llava(), tok, task, "seven", **kw)  # leaves the step-2 checkpoint
    ckpt = tmp_path / "checkpoint"
    os.replace(ckpt, str(ckpt) + ".old")  # the first rename of the next save happened, then the crash
    (tmp_path / "checkpoint.tmp").mkdir()  # and a half-written new one
    res = run_lm_method("ga", tiny_llava(), tok, task, "seven", **kw)
    assert res.resumed_from == 2 and len(res.history) == 3
