"""Text metrics on hand-made cases with known answers: concept mentions / efficacy,
diversity, ROUGE-1/2/L (values worked out by hand, LCS against brute force), answer
correctness; AUCs on separable and tied scores, privleak, MultiDelete's chunked AUC."""
import itertools
import math
import random
from types import SimpleNamespace

import pytest

from unlearn_fast.metrics import mia, text


# ----------------------------------------------------------------------------- mentions
SEVEN = SimpleNamespace(name="seven", variants=("seven", "7"))


@pytest.mark.parametrize("answer,expected", [
    ("This is seven.", True),
    ("It's SEVEN!", True),
    ("seven-ish", True),
    ("seventeen", False),
    ("This is 7.", True),
    ("It is 17.", False),
    ("7", True),
    ("no idea", False),
    ("", False),
])
def test_mentions_word_boundaries_and_case(answer, expected):
    assert text.mentions(answer, SEVEN) is expected


def test_mentions_multiword_name_any_whitespace():
    c = SimpleNamespace(name="Donald Trump", variants=("Trump",))
    assert text.mentions("I saw donald\n  TRUMP today", c)
    assert text.mentions("Mr. Trump.", c)
    assert not text.mentions("Donald Duck", c)
    assert not text.mentions("trumpet", c)


def test_efficacy_counts_answers_without_the_name():
    answers = ["This is seven.", "It's SEVEN!", "seventeen", "This is 7.", "no idea"]
    assert text.efficacy(answers, SEVEN) == pytest.approx(40.0)
    assert text.efficacy(answers, ["seven"]) == pytest.approx(60.0)  # "7" no longer a spelling
    assert text.efficacy(answers, "seven") == pytest.approx(60.0)
    assert math.isnan(text.efficacy([], SEVEN))


def test_efficacy_rejects_bad_input():
    with pytest.raises(TypeError, match="answers"):
        text.efficacy("This is seven.", SEVEN)
    with pytest.raises(TypeError, match=r"answers\[1\]"):
        text.efficacy(["a", 3], SEVEN)
    with pytest.raises(ValueError, match="no non-empty name"):
        text.efficacy(["a"], ["", "  "])


def test_diversity_percent_unique_whitespace_tokens():
    assert text.diversity(["a b a b", "x y z", ""]) == pytest.approx((50 + 100 + 0) / 3)
    assert text.diversity(["word"]) == pytest.approx(100.0)
    assert math.isnan(text.diversity([]))


# ------------------------------------------------------------------------------ ROUGE
@pytest.mark.parametrize("pred,ref,p,r", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6, 5 / 6),
    ("A B C D", "B D E", 2 / 4, 2 / 3),
    ("a b c b d a b", "b d c a b a", 4 / 7, 4 / 6),  # the textbook LCS example, length 4
    ("Hello, World!", "hello world", 1.0, 1.0),      # case and punctuation are separators
    ("", "abc", 0.0, 0.0),
    ("", "", 0.0, 0.0),
])
def test_rouge_l_known_strings(pred, ref, p, r):
    score = text.rouge_l(pred, ref, full=True)
    f = 2 * p * r / (p + r) if p + r else 0.0
    assert score.precision == pytest.approx(p)
    assert score.recall == pytest.approx(r)
    assert score.fmeasure == pytest.approx(f)
    assert text.rouge_l(pred, ref) == pytest.approx(f)


def test_rouge_n_known_strings():
    # bigrams: the-cat, on-the, the-mat shared out of 5 each
    assert text.rouge_n("the cat sat on the mat", "the cat is on the mat", 2) == pytest.approx(3 / 5)
    # unigram counts are clipped: "the" x3 vs x1 -> overlap 1, P = 1/3, R = 1/2
    assert text.rouge_n("the the the", "the cat", 1) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert text.rouge_n("a", "a", 2) == 0.0  # no bigram on either side
    with pytest.raises(ValueError, match="n must"):
        text.rouge_n("a", "a", 0)


def _lcs_brute(a, b):
    for n in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, n))
        if any(c in subs for c in itertools.combinations(a, n)):
            return n
    return 0


def test_lcs_matches_brute_force():
    rng = random.Random(7)
    for _ in range(60):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert text.lcs_length(a, b) == _lcs_brute(a, b), (a, b)


def test_rouge_stemmer_hook_and_mean():
    stem = lambda t: t[:-1] if t.endswith("s") else t  # noqa: E731  (toy stemmer)
    assert text.rouge_l("cats sit", "cat sit") < 1.0
    assert text.rouge_l("cats sit", "cat sit", stemmer=stem) == pytest.approx(1.0)
    assert text.mean_rouge(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in length"):
        text.mean_rouge(["a"], [])
    with pytest.raises(TypeError):
        text.rouge_l(None, "a")


def test_answer_correct_is_boundary_aware():
    assert text.answer_correct("The answer is eight.", "Eight.")
    assert not text.answer_correct("eighteen", "eight")
    assert text.answer_correct("Yes. Seven is after six!", "seven is after six")
    assert not text.answer_correct("anything", "")
    assert text.accuracy(["Eight.", "Nine."], ["Eight.", "Ten."]) == pytest.approx(50.0)


def test_mentions_own_concept():
    preds = ["This is seven.", "This is one.", "blah"]
    concepts = [SEVEN, SimpleNamespace(name="two", variants=("2",)), "blah"]
    assert text.mentions_own_concept(preds, concepts) == pytest.approx(200 / 3)


# -------------------------------------------------------------------------------- AUCs
def _auc_brute(pos, neg):
    total = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_mia_auc_separable_tied_and_direction():
    forget, holdout = [5.0, 6.0, 7.0], [1.0, 2.0, 3.0]
    assert mia.mia_auc(forget, holdout) == 1.0
    assert mia.mia_auc(forget, holdout, higher_is_member=False) == 0.0
    assert mia.mia_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    rng = random.Random(3)
    pos = [rng.randint(0, 5) for _ in range(17)]
    neg = [rng.randint(0, 5) for _ in range(23)]
    assert mia.roc_auc(pos, neg) == pytest.approx(_auc_brute(pos, neg))


def test_mia_aucs_use_each_scores_direction():
    forget = {"loss": [0.1, 0.2], "min_k": [-0.1, -0.2]}
    holdout = {"loss": [1.0, 2.0], "min_k": [-3.0, -4.0]}
    out = mia.mia_aucs(forget, holdout)
    assert out == {"mia_auc_loss": 1.0, "mia_auc_min_k": 1.0}  # memorised by both readings


def test_auc_input_errors():
    with pytest.raises(ValueError, match="forget_scores is empty"):
        mia.mia_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mia.mia_auc([float("nan")], [1.0])
    with pytest.raises(TypeError, match="higher_is_member"):
        mia.mia_auc([1.0], [0.0], higher_is_member=1)


def test_privleak_relative_percent():
    assert mia.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert mia.privleak(0.5, 0.5) == 0.0
    assert mia.privleak(0.25, 0.5) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="reference_auc"):
        mia.privleak(0.5, 1.5)


def test_pair_auc_averages_over_retain_chunks():
    forget = [0.1, 0.2]
    assert mia.pair_auc(forget, [0.8, 0.9, 0.7, 0.95]) == 1.0
    # chunks [0.05, 0.9] -> 2/4 and [0.15, 0.3] -> 3/4
    assert mia.pair_auc(forget, [0.05, 0.9, 0.15, 0.3]) == pytest.approx(0.625)
    # one chunk: the plain AUC over all retained pairs
    assert mia.pair_auc(forget, [0.05, 0.9, 0.15, 0.3], chunks=1) == pytest.approx(_auc_brute([0.05, 0.9, 0.15, 0.3],
                                                                                               forget))
    with pytest.raises(ValueError, match="chunks"):
        mia.pair_auc(forget, [0.5], chunks=3)
