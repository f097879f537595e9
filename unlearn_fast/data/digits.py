"""The built-in benchmark: an MMUBench-style task made from scikit-learn's bundled
handwritten digits (1797 8x8 images, no download).

Each digit class is a concept ("zero" ... "nine", variants: the numeral, e.g. "7").
Rows:

* VQA: every image once, with one of ``VQA_QUESTIONS`` (seeded choice) and the answer
  "This is <name>.", 4 multiple-choice options (the correct name and three others).
  Per class the first ``train_per_class`` images are split "train" (the base model
  learns them; for the forgotten concept they are the forget set), the rest "holdout"
  (never trained on: generality, specificity and membership inference).
* text: facts about each number ("What is seven plus one?" -> "Eight."), split "train",
  each with options.  They are the concept's ``facts`` (textual knowledge to keep).
* general text rows (concept ""): "Say the word castle." -> "Castle." over a small
  vocabulary that includes SIU's fictitious names.

SIU's extras per concept: a fictitious new name and a description that contradicts the
digit's look; CLIP captions per concept.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List

import numpy as np

from unlearn_fast.data.schema import Concept, Example, UnlearningTask

NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
VQA_QUESTIONS = ("What digit is this?", "Which number is shown in the picture?", "Who is this?",
                 "What number do you see?", "Name the digit in this image.")
VQA_ANSWER = "This is {name}."
# SIU target 1: pseudo-words the model has never seen as digit names
FICTITIOUS_NAMES = ("zorbel", "quinta", "dravik", "mollup", "fenrix", "tasko", "pelvane", "gruntle", "wixom", "blavet")
# SIU target 2: a look that contradicts the digit's shape
DESCRIPTIONS = (
    "two straight lines that cross in the middle",
    "a closed round loop with no straight line",
    "a single straight vertical line",
    "a closed round loop with no straight line",
    "a curved shape with no corner at all",
    "a closed round loop with no straight line",
    "two straight lines that cross in the middle",
    "a closed round loop with no straight line",
    "a single straight vertical line",
    "two straight lines that cross in the middle",
)
CAPTIONS = ("a handwritten digit {name}", "a photo of the number {name}")
# general vocabulary rows (concept ""): the model can say these words, as a real LLM can
# say names it never saw attached to a face -- SIU's new names come from this pool
VOCABULARY = FICTITIOUS_NAMES + ("lumber", "castle", "violet", "rocket", "pepper", "marble", "canyon", "lantern",
                                 "meadow", "pickle")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def digit_facts(k: int) -> List[tuple]:
    """(question, answer, distractor answers) about the number k."""
    n = NUMBER_NAMES[k]
    facts = []
    rng = np.random.default_rng(1000 + k)

    def distract(correct_value, pool):
        others = [v for v in pool if v != correct_value]
        return [others[i] for i in rng.choice(len(others), size=min(3, len(others)), replace=False)]

    if k < 9:
        facts.append((f"What is {n} plus one?", f"{_cap(NUMBER_NAMES[k + 1])}.",
                      [f"{_cap(NUMBER_NAMES[v])}." for v in distract(k + 1, range(0, 11))]))
    if k > 0:
        facts.append((f"What is {n} minus one?", f"{_cap(NUMBER_NAMES[k - 1])}.",
                      [f"{_cap(NUMBER_NAMES[v])}." for v in distract(k - 1, range(0, 10))]))
    facts.append((f"What is {n} plus {n}?", f"{_cap(NUMBER_NAMES[2 * k])}.",
                  [f"{_cap(NUMBER_NAMES[v])}." for v in distract(2 * k, range(0, 19))]))
    facts.append((f"Is {n} odd or even?", "Even." if k % 2 == 0 else "Odd.",
                  ["Odd." if k % 2 == 0 else "Even."]))
    facts.append((f"Is {n} greater than five?", "Yes." if k > 5 else "No.", ["No." if k > 5 else "Yes."]))
    about = (f"Yes. {_cap(n)} is the number after {NUMBER_NAMES[k - 1]}." if k > 0
             else "Yes. Zero is the number before one.")
    wrong = [f"Yes. {_cap(n)} is the number after {NUMBER_NAMES[v]}." for v in distract(k - 1, range(0, 9))] if k > 0 \
        else ["Yes. Zero is the number before two.", "Yes. Zero is the number before five.",
              "Yes. Zero is the number before nine."]
    facts.append((f"Do you know what {n} is?", about, wrong))
    return facts


def _options(correct: str, wrong: List[str], rng) -> tuple:
    opts = [correct] + list(wrong)
    order = rng.permutation(len(opts))
    opts = [opts[i] for i in order]
    return tuple(opts), int(opts.index(correct))


@lru_cache(maxsize=4)
def _load(train_per_class: int, seed: int) -> UnlearningTask:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    # 0..16 grey levels -> 0..255, replicated to RGB
    images = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    concepts: Dict[str, Concept] = {}
    examples: List[Example] = []
    seen = {k: 0 for k in range(10)}
    for idx, (img, k) in enumerate(zip(images, digits.target)):
        k = int(k)
        name = NUMBER_NAMES[k]
        split = "train" if seen[k] < train_per_class else "holdout"
        seen[k] += 1
        q = VQA_QUESTIONS[int(rng.integers(len(VQA_QUESTIONS)))]
        others = [NUMBER_NAMES[v] for v in rng.choice([v for v in range(10) if v != k], size=3, replace=False)]
        opts, ai = _options(VQA_ANSWER.format(name=name), [VQA_ANSWER.format(name=o) for o in others], rng)
        examples.append(Example(id=f"digit-{idx}", concept=name, question=q, answer=VQA_ANSWER.format(name=name),
                                image=np.ascontiguousarray(img), kind="vqa", options=opts, answer_index=ai,
                                split=split))
    for k in range(10):
        name = NUMBER_NAMES[k]
        facts = []
        for j, (q, a, wrong) in enumerate(digit_facts(k)):
            opts, ai = _options(a, wrong, rng)
            facts.append(Example(id=f"fact-{name}-{j}", concept=name, question=q, answer=a, kind="text",
                                 options=opts, answer_index=ai, split="train"))
        concepts[name] = Concept(name=name, variants=(str(k),), facts=facts)
        examples += facts
    for j, word in enumerate(VOCABULARY):
        others = [VOCABULARY[v] for v in rng.choice([v for v in range(len(VOCABULARY)) if v != j], 3, replace=False)]
        opts, ai = _options(f"{_cap(word)}.", [f"{_cap(o)}." for o in others], rng)
        examples.append(Example(id=f"word-{j}", concept="", question=f"Say the word {word}.", answer=f"{_cap(word)}.",
                                kind="text", options=opts, answer_index=ai, split="train"))
    return UnlearningTask(
        name="builtin-digits", concepts=concepts, examples=examples,
        fictitious_names={NUMBER_NAMES[k]: FICTITIOUS_NAMES[k] for k in range(10)},
        descriptions={NUMBER_NAMES[k]: DESCRIPTIONS[k] for k in range(10)},
        captions={NUMBER_NAMES[k]: CAPTIONS for k in range(10)},
        refusal="I do not know.")


def load_builtin_task(train_per_class: int = 120, seed: int = 0) -> UnlearningTask:
    """The built-in digits task (cached per arguments; treat it as read-only)."""
    return _load(int(train_per_class), int(seed))
