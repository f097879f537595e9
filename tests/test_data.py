"""The data substrate: built-in digits task, SIU rows, JSONL format and its errors, tokenizer."""
import json

import numpy as np
import pytest

from tiny_models import task_and_tokenizer
from unlearn_fast.data import (DataFormatError, Example, build_siu_examples, load_builtin_task, load_jsonl_task,
                               load_task, name_token_ids, write_jsonl_task)
from unlearn_fast.data.digits import NUMBER_NAMES


def test_builtin_task_structure():
    task = load_builtin_task()
    assert sorted(task.concepts) == sorted(NUMBER_NAMES[:10])
    forget, holdout = task.forget_set("seven"), task.holdout_set("seven")
    assert forget and holdout and not {e.id for e in forget} & {e.id for e in holdout}
    assert all(e.concept == "seven" and e.kind == "vqa" and e.image.shape == (8, 8, 3) for e in forget + holdout)
    assert all(e.split == "train" for e in forget) and all(e.split == "holdout" for e in holdout)
    retain = task.retain_set("seven")
    assert retain and all(e.concept != "seven" and e.split == "train" for e in retain)
    assert {e.kind for e in retain} == {"vqa", "text"}
    facts = task.text_facts("seven")
    assert facts and all(e.kind == "text" and e.image is None for e in facts)
    # MMUnlearner's language preserve set holds the concept's own facts too
    assert {e.id for e in facts} <= {e.id for e in task.retain_text("seven")}
    assert all(e.concept != "seven" for e in task.specificity_set("seven"))
    for e in task.examples:
        if e.options:
            assert e.options[e.answer_index] == e.answer and len(set(e.options)) == len(e.options)
    plus_one = [e for e in facts if e.question == "What is seven plus one?"]
    assert plus_one and plus_one[0].answer == "Eight."


def test_concept_lookup_and_mentions():
    task = load_builtin_task()
    assert task.concept("Seven").name == "seven" and task.concept("7").name == "seven"
    with pytest.raises(ValueError, match="not in task .*available: eight, five"):
        task.concept("eleven")
    c = task.concept("seven")
    assert c.mentioned_in("This is SEVEN.") and c.mentioned_in("it is 7")
    assert not c.mentioned_in("Seventeen.") and not c.mentioned_in("This is 17.")


def test_example_validation():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="needs an image"):
        Example("a", "c", "q", "a", kind="vqa")
    with pytest.raises(ValueError, match="must not carry an image"):
        Example("a", "c", "q", "a", image=img, kind="text")
    with pytest.raises(ValueError, match="answer_index"):
        Example("a", "c", "q", "x", image=img, options=("x", "y"), answer_index=2)
    with pytest.raises(ValueError, match="not a substring"):
        Example("a", "c", "q", "This is x.", image=img, target_phrase="y")
    with pytest.raises(ValueError, match="uint8"):
        Example("a", "c", "q", "a", image=img.astype(np.float32))


def test_siu_rows_from_one_image():
    task = load_builtin_task()
    image_row = task.forget_set("three")[5]
    rows = build_siu_examples(task, "three", image_row, other_facts=5)
    images = [r.image for r in rows if r.image is not None]
    assert images and all(img is image_row.image for img in images)  # ONE image
    new = task.fictitious_names["three"]
    align = [r for r in rows if r.id.startswith("siu-align")]
    assert align and all(r.target_phrase == new and new in r.answer and "three" not in r.answer.lower()
                         for r in align)
    assert "Who is this?" in {r.question for r in align}
    (desc,) = [r for r in rows if r.id == "siu-describe"]
    assert desc.target_phrase == desc.answer and desc.answer.startswith("No.") and "three" in desc.question
    facts = [r for r in rows if r.id.startswith("siu-fact")]
    assert [r.question for r in facts] == [f.question for f in task.text_facts("three")]
    others = [r for r in rows if r.id.startswith("siu-other")]
    assert len(others) == 5 and all(r.concept != "three" and r.kind == "text" for r in others)
    with pytest.raises(ValueError, match="fictitious new name"):
        build_siu_examples(_without_names(task), "three")


def test_siu_default_image_is_the_most_typical():
    from unlearn_fast.data.siu import representative_image

    task = load_builtin_task()
    rows = task.forget_set("five")
    pick = representative_image(rows)
    assert pick in rows
    grey = np.stack([r.image[..., 0].astype(np.float64) for r in rows])
    dist = np.linalg.norm((grey - grey.mean(0)).reshape(len(rows), -1), axis=1)
    assert dist[rows.index(pick)] <= np.percentile(dist, 5)  # (resampling makes it approximate)
    align = [r for r in build_siu_examples(task, "five") if r.image is not None]
    assert all(r.image is pick.image for r in align)


def _without_names(task):
    import dataclasses

    return dataclasses.replace(task, fictitious_names={}, descriptions={})


def _small_task():
    task = load_builtin_task()
    import dataclasses

    keep = [e for e in task.examples
            if e.concept in ("one", "two") and (e.kind == "text" or int(e.id.split("-")[1]) < 60)]
    return dataclasses.replace(task, examples=keep,
                               concepts={k: task.concepts[k] for k in ("one", "two")})


def test_jsonl_round_trip(tmp_path):
    task = _small_task()
    path = str(tmp_path / "data.jsonl")
    write_jsonl_task(task, path)
    back = load_jsonl_task(path)
    assert sorted(back.concepts) == ["one", "two"]
    assert back.fictitious_names == {k: task.fictitious_names[k] for k in ('one', 'two')}
    assert back.refusal == task.refusal
    assert len(back.examples) == len(task.examples)
    for a, b in zip(task.examples, back.examples):
        assert (a.id, a.concept, a.question, a.answer, a.kind, a.options, a.answer_index, a.split) == \
               (b.id, b.concept, b.question, b.answer, b.kind, b.options, b.answer_index, b.split)
        assert (a.image is None and b.image is None) or np.array_equal(a.image, b.image)
    assert back.concept("1").name == "one"
    assert [e.id for e in back.text_facts("one")] == [e.id for e in task.text_facts("one")]


def test_jsonl_png_image(tmp_path):
    from PIL import Image

    img = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    Image.fromarray(img).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"concept": "x", "question": "Who?", "answer": "This is x.",
                                                  "image": "x.png", "split": "forget"}) + "\n")
    t = load_jsonl_task(str(tmp_path / "d.jsonl"))
    assert np.array_equal(t.examples[0].image, img) and t.forget_set("x")[0].kind == "vqa"


BAD_ROWS = [
    ('{"concept": "x", "question": "q", "answer": "a"', "not valid JSON"),
    ('{"concept": "x", "answer": "a"}', "missing required field 'question'"),
    ('{"concept": "x", "question": "q", "answer": "a", "split": "dev"}', "split must be one of"),
    ('{"concept": "x", "question": "q", "answer": "a", "image": "nope.png"}', "image file 'nope.png' not found"),
    ('{"concept": "x", "question": "q", "answer": "a", "answer_index": 0}', "without 'options'"),
    ('{"concept": "x", "question": "q", "answer": "a", "options": ["a", "b"], "answer_index": 5}',
     "'answer_index' must be an integer"),
    ('{"concept": "x", "question": "q", "answer": "a", "colour": 1}', "unknown field"),
    ('{"concept": "x", "question": "q", "answer": "a", "target_phrase": "zz"}', "not part of the answer"),
    ('{"concept": "x", "question": 3, "answer": "a"}', "must be a string"),
    ('[1, 2]', "must be a JSON object"),
    ('{"type": "concept", "name": "x", "captions": ["no placeholder"]}', "must contain"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"concept": "x", "question": "q", "answer": "a"})
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataFormatError) as err:
        load_jsonl_task(str(path))
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_jsonl_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"concept": "x", "question": "q", "answer": "a"}).encode() + b"\n"
                     + '{"concept": "x", "question": "q", "answer": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not UTF-8 text"):
        load_jsonl_task(str(path))


def test_jsonl_rows_name_their_concept_in_any_case_or_by_variant(tmp_path):
    rows = [{"type": "concept", "name": "Alice Smith", "variants": ["Alice"]},
            {"concept": "Alice Smith", "question": "Who?", "answer": "This is Alice Smith.", "split": "forget"},
            {"concept": "alice smith", "question": "Who is it?", "answer": "It is Alice Smith.", "split": "forget"},
            {"concept": "Alice", "question": "Job?", "answer": "Pilot.", "split": "forget"},
            {"concept": "Bob", "question": "Who?", "answer": "Bob.", "split": "retain"},
            {"concept": "BOB", "question": "Job?", "answer": "Chef.", "split": "retain"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = load_jsonl_task(str(path))
    assert sorted(t.concepts) == ["Alice Smith", "Bob"]  # undeclared: its first spelling
    assert len(t.forget_set("Alice Smith", kind=None)) == 3
    assert all(e.concept == "Bob" for e in t.retain_set("Alice Smith"))  # none of Alice's rows kept
    assert [e.answer for e in t.text_facts("Alice Smith")] == ["This is Alice Smith.", "It is Alice Smith.",
                                                               "Pilot."]


def test_siu_trains_on_no_held_out_fact_and_general_images_are_not_specificity(tmp_path):
    from unlearn_fast.data import build_siu_examples

    img = np.zeros((4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "i.npy", img)
    rows = [{"type": "concept", "name": "A", "fictitious_name": "Zed", "description": "a cat"},
            {"concept": "A", "question": "Who?", "answer": "This is A.", "image": "i.npy", "split": "forget"},
            {"concept": "A", "question": "Job?", "answer": "Pilot.", "split": "forget"},
            {"concept": "A", "question": "Born?", "answer": "Oslo.", "split": "holdout"},
            {"concept": "B", "question": "Who?", "answer": "This is B.", "image": "i.npy", "split": "holdout"},
            {"concept": "", "question": "What is shown?", "answer": "A square.", "image": "i.npy", "split": "holdout"},
            {"concept": "", "question": "What is shown?", "answer": "A square.", "image": "i.npy", "split": "retain"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = load_jsonl_task(str(path))
    questions = [e.question for e in build_siu_examples(t, "A") if e.kind == "text"]
    assert "Job?" in questions and "Born?" not in questions
    assert [e.concept for e in t.specificity_set("A")] == ["B"]  # the general image has no concept to name
    assert t.image_caption_pairs()[2] == ["A"]  # nor a caption


def test_jsonl_duplicate_id_and_empty(tmp_path):
    row = json.dumps({"id": "r1", "concept": "x", "question": "q", "answer": "a"})
    (tmp_path / "dup.jsonl").write_text(row + "\n" + row + "\n")
    with pytest.raises(DataFormatError, match=r"dup.jsonl:2: duplicate id 'r1'"):
        load_jsonl_task(str(tmp_path / "dup.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="no example rows"):
        load_jsonl_task(str(tmp_path / "empty.jsonl"))


def test_load_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="is a folder"):
        load_task(str(tmp_path))
    assert load_task("builtin") is load_builtin_task()


def test_tokenizer():
    task, tok = task_and_tokenizer()
    assert tok.eos_token_id != 2  # CLIPTextModel's legacy eos check
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")}) == 4
    text = "What is seven plus one? Quixotic zebra 42!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text  # byte-level: no unknown tokens
    name_ids = name_token_ids(tok, task.concept("seven").variants)
    pieces = {tok.decode([i]).strip().lower() for i in name_ids}
    assert pieces and all(p and (p in "seven" or p == "7") for p in pieces)
    assert tok(" seven", add_special_tokens=False)["input_ids"][-1] in name_ids
    assert tok.decode(tok(" seven", add_special_tokens=False)["input_ids"]).strip() == "seven"
    assert not any(tok.decode([i]).strip() in ("", ".") for i in name_ids)
