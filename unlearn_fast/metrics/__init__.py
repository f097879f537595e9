"""The evaluation engine: every unlearning metric from one pass per evaluation set.

Likelihood scores (one fused forward per set; :mod:`.scores`)
    sequence_scores   per example: answer log-prob, LOSS, probability, perplexity, ZLib,
                      Min-K% (k = 0.4), Min-K%++, exact memorisation
    fluency           perplexity on the original model's answers, name tokens excluded
    c_dis             SIU's C-Dis from one teacher and one student pass
Generation (:mod:`.generation`) and text metrics (:mod:`.text`)
    generate_greedy, generate_answers   batched greedy decoding, KV cache, stop criteria
    efficacy, generality, diversity, rouge_l, rouge_n, accuracy, mentions
Multiple choice (:mod:`.choice`)
    multiple_choice_accuracy            option log-likelihood, all options in one pass
Membership inference and pairs (:mod:`.mia`)
    mia_auc, mia_aucs, privleak, pair_auc, roc_auc
Whole tasks (:mod:`.evaluate`)
    evaluate_task (LLaVA / Qwen2-VL), evaluate_pairs (CLIP), evaluate_sets
Reports (:mod:`.report`) and the ``unlearn-fast eval`` command (:mod:`.cli`).
"""
from unlearn_fast.metrics.choice import multiple_choice_accuracy
from unlearn_fast.metrics.evaluate import evaluate_pairs, evaluate_sets, evaluate_task
from unlearn_fast.metrics.generation import generate_answers, generate_greedy
from unlearn_fast.metrics.mia import MEMBER_DIRECTION, mia_auc, mia_aucs, pair_auc, privleak, roc_auc
from unlearn_fast.metrics.scores import SCORE_NAMES, c_dis, fluency, scores_from_token_stats, sequence_scores
from unlearn_fast.metrics.text import (accuracy, diversity, efficacy, generality, mentions, rouge_l, rouge_n)

__all__ = [
    "sequence_scores", "scores_from_token_stats", "SCORE_NAMES", "fluency", "c_dis",
    "generate_greedy", "generate_answers",
    "efficacy", "generality", "diversity", "rouge_l", "rouge_n", "accuracy", "mentions",
    "multiple_choice_accuracy",
    "mia_auc", "mia_aucs", "privleak", "pair_auc", "roc_auc", "MEMBER_DIRECTION",
    "evaluate_task", "evaluate_pairs", "evaluate_sets",
]
