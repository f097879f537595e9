"""Public-format loaders on small fixtures built here: MLLMU-Bench parquet rows (image
bytes, Classification / Mask / Generation tasks, splits from folder names) and an
MMUBench-style folder of images per concept; clear errors on malformed input."""
import io
import json

import numpy as np
import pytest

from unlearn_fast.data import loaders_public as L

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _png(color, size=(6, 5)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _profile(pid, color, name=None, test=False):
    opts = {"A": f"{pid} lives in Paris", "B": "Rome", "C": "Oslo", "D": "Lima"}
    row = {
        "ID": pid,
        "biography": f"{pid} is a fictitious person.",
        "question": "Who is this person?",
        "answer": f"This is {name or pid}.",
        "Classification_Task": {
            "Image_Textual_Questions": [{"Question": "Where does this person live?", "Options": opts,
                                         "Correct_Answer": "A"}],
            "Pure_Text_Questions": [{"Question": f"Where does {pid} live?", "Options": opts,
                                     "Correct_Answer": "B"}],
        },
        "Mask_Task": [{"Question": "This person was born in __.", "Ground_Truth": "1990", "Type": "Image_Textual"},
                      {"Question": f"{pid} works as a __.", "Ground_Truth": "baker", "Type": "Pure_Text"}],
        "Generation_Task": [{"Question": f"What does {pid} like?", "Ground_Truth": "Bread.", "Type": "Pure_Text"}],
    }
    if test:
        row["images"] = [{"bytes": _png(color), "path": None}, {"bytes": _png((0, 0, 0)), "path": None}]
    else:
        row["image"] = {"bytes": _png(color, size=(7, 4)), "path": None}
    if name:
        row["name"] = name
    return row


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_mllmu_rows_to_examples(tmp_path):
    f = _write(tmp_path / "forget_5" / "train-00000-of-00001.parquet",
               [_profile("p1", (255, 0, 0), name="Ann Lee"), _profile("p2", (0, 255, 0))])
    task = L.load_mllmu_bench(str(tmp_path / "forget_5"))
    assert set(task.concepts) == {"Ann Lee", "p2"}
    rows = [e for e in task.examples if e.concept == "Ann Lee"]
    assert len(rows) == 1 + 2 + 2 + 1  # vqa pair, 2 classification, 2 mask, 1 generation
    assert all(e.split == "forget" for e in task.examples)
    by_tag = {e.id.split("p1-", 1)[1]: e for e in rows}
    vqa = by_tag["cls-vqa-0"]
    assert vqa.kind == "vqa" and vqa.image.shape == (4, 7, 3) and vqa.image.dtype == np.uint8
    assert tuple(vqa.image[0, 0]) == (255, 0, 0)
    assert vqa.options[vqa.answer_index] == "p1 lives in Paris" == vqa.answer
    txt = by_tag["cls-text-0"]
    assert txt.kind == "text" and txt.image is None and txt.answer == "Rome" and txt.answer_index == 1
    assert "[Blank]" in by_tag["mask-0"].question and by_tag["mask-0"].answer == "1990"
    assert by_tag["mask-1"].kind == "text"
    assert by_tag["generation-0"].answer == "Bread."
    assert by_tag["vqa"].answer == "This is Ann Lee."
    # the concept's facts are its text rows
    assert {e.id for e in task.concepts["Ann Lee"].facts} == {e.id for e in rows if e.kind == "text"}
    # one file directly, split given by mapping, names by ID, a task subset
    t2 = L.load_mllmu_bench({"retain": f}, names={"p2": "Bo Chen"}, tasks=("classification",))
    assert set(t2.concepts) == {"Ann Lee", "Bo Chen"} and all(e.split == "retain" for e in t2.examples)
    assert len(t2.examples) == 4


def test_mllmu_dataset_root_with_split_folders_and_test_images(tmp_path):
    _write(tmp_path / "forget_5" / "a.parquet", [_profile("p1", (255, 0, 0))])
    _write(tmp_path / "retain_95" / "a.parquet", [_profile("p2", (0, 0, 255))])
    _write(tmp_path / "Test_Set" / "a.parquet", [_profile("p1", (9, 9, 9), test=True)])
    task = L.load_public(str(tmp_path))
    assert sorted({e.split for e in task.examples}) == ["forget", "retain", "test"]
    test_rows = [e for e in task.examples if e.split == "test" and e.kind == "vqa"]
    assert tuple(test_rows[0].image[0, 0]) == (9, 9, 9)  # the first of the test views
    assert len({e.id for e in task.examples}) == len(task.examples)
    assert task.forget_set("p1", kind="vqa") and task.holdout_set("p1", kind="vqa")


def test_mllmu_errors_name_the_place(tmp_path):
    bad = _profile("p1", (1, 2, 3))
    bad["Classification_Task"]["Pure_Text_Questions"][0]["Correct_Answer"] = "Z"
    f = _write(tmp_path / "x.parquet", [bad])
    with pytest.raises(L.PublicFormatError, match=r"x.parquet row 0 \(ID p1\).*Correct_Answer"):
        L.load_mllmu_bench(f)
    bad = _profile("p1", (1, 2, 3))
    bad["Mask_Task"][0]["Type"] = "Video"
    with pytest.raises(L.PublicFormatError, match="Type must be"):
        L.load_mllmu_bench(_write(tmp_path / "y.parquet", [bad]))
    bad = _profile("p1", (1, 2, 3))
    bad["image"] = {"bytes": b"not an image", "path": None}
    with pytest.raises(L.PublicFormatError, match="cannot decode"):
        L.load_mllmu_bench(_write(tmp_path / "z.parquet", [bad]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(L.PublicFormatError, match="no .parquet"):
        L.load_mllmu_bench(str(tmp_path / "empty"))
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(L.PublicFormatError, match="not a readable parquet"):
        L.load_mllmu_bench(str(tmp_path / "junk.parquet"))
    with pytest.raises(ValueError, match="unknown MLLMU task"):
        L.load_mllmu_bench(f, tasks=("cloze",))


def _image_folder(root):
    from PIL import Image

    for concept, color in (("Donald_Trump", (200, 10, 10)), ("Mona_Lisa", (10, 200, 10)), ("Elsa", (0, 0, 200))):
        d = root / concept
        d.mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (5 + j, 4), color).save(d / f"img{j}.png")
    (root / "Elsa" / "notes.txt").write_text("not an image")
    (root / "concepts.json").write_text(json.dumps({"Donald Trump": {"variants": ["Trump", "Donald"]}}))
    (root / "Mona_Lisa" / "facts.jsonl").write_text(
        json.dumps({"question": "Who painted the Mona Lisa?", "answer": "Leonardo da Vinci."}) + "\n\n")


def test_mmubench_folder(tmp_path):
    _image_folder(tmp_path)
    task = L.load_public(str(tmp_path))
    assert set(task.concepts) == {"Donald Trump", "Mona Lisa", "Elsa"}
    assert set(task.concepts["Donald Trump"].variants) >= {"Trump", "Donald"}
    forget = task.forget_set("Donald Trump")
    assert len(forget) == 1 and forget[0].id == "Donald_Trump/img0.png"  # SIU: one training image
    assert len(task.holdout_set("Donald Trump")) == 2
    e = forget[0]
    assert e.question == "Who is this?" and e.answer == "This is Donald Trump."
    assert e.image.shape == (4, 5, 3) and tuple(e.image[0, 0]) == (200, 10, 10)
    assert len(e.options) == 3 and e.options[e.answer_index] == e.answer  # the other two concepts
    facts = task.text_facts("Mona Lisa")
    assert [f.answer for f in facts] == ["Leonardo da Vinci."] and facts[0].kind == "text"
    t2 = L.load_mmubench_folder(str(tmp_path), train_images=2, answer_template="It is {name}.", num_options=2)
    assert len(t2.forget_set("Elsa")) == 2 and t2.forget_set("Elsa")[0].answer == "It is Elsa."
    assert all(len(r.options) == 2 for r in t2.examples if r.kind == "vqa")


def test_mmubench_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        L.load_mmubench_folder(str(tmp_path / "missing"))
    (tmp_path / "a").mkdir()
    with pytest.raises(L.PublicFormatError, match="no concept folder"):
        L.load_mmubench_folder(str(tmp_path))
    _image_folder(tmp_path / "ok")
    (tmp_path / "ok" / "Elsa" / "facts.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(L.PublicFormatError, match=r"facts.jsonl:1"):
        L.load_mmubench_folder(str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="train_images"):
        L.load_mmubench_folder(str(tmp_path / "ok"), train_images=-1)
