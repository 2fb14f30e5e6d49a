import json

import pytest
import torch
from PIL import Image

from dori import load_prompt_set
from dori.data.prompts import load_reference, read_nemo_csv, read_text, read_webster_parquet, read_wen_jsonl
from dori.errors import DoriError

NEMO_HEADER = "Caption;URL;type;mean_sscd;max_sscd;Index\n"


def _png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10), color).save(path)


def test_nemo_csv_with_one_image_on_disk_and_one_dead_link(tmp_path):
    f = tmp_path / "nemo.csv"
    f.write_text(NEMO_HEADER + "The Colosseum;http://x/1.jpg;VM;0.9;0.95;17\nA poster;http://x/2.jpg;TM;0.5;0.6;23\n")
    _png(tmp_path / "imgs" / "17.jpg")
    recs = read_nemo_csv(f, tmp_path / "imgs")
    assert [r.kind for r in recs] == ["VM", "TM"] and recs[0].index == "17"
    assert recs[0].reference_status == "ok" and recs[0].memorized
    assert recs[1].reference_status == "missing" and "23" in recs[1].meta["missing_reason"]
    img = load_reference(recs[0])
    assert img.shape == (3, 10, 20) and img[0].min() > 0.9 and img[2].max() < 0.1  # red, JPEG-compressed
    with pytest.raises(DoriError, match="no reference image"):
        load_reference(recs[1])  # never a blank image


def test_malformed_nemo_csv_names_the_missing_columns(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("Caption,URL,type\nfoo,bar,VM\n")  # comma-separated: wrong delimiter
    with pytest.raises(DoriError, match=r"missing column\(s\).*Expected columns"):
        load_prompt_set(f)


def test_nemo_unmemorized_csv_and_the_control_set(tmp_path, monkeypatch):
    """NeMo's unmemorized_laion_prompts.csv (no type column, a leading index column) is a set of kind N, the
    bypass's control on SD; a control set must hold non-memorized prompts, some with their image on disk."""
    from dori.data.prompts import load_control_set

    f = tmp_path / "unmemorized_laion_prompts.csv"
    f.write_text(";Caption;URL;Index\n0;Soaring by Peter Eades;http://x/a.jpg;7984\n1;Grace Kelly Outfits;u;31816\n")
    with pytest.raises(DoriError, match=r"missing column\(s\) \['type'\]"):  # as the prompt set: its kinds unsaid
        load_prompt_set(f)
    assert [r.kind for r in read_nemo_csv(f, default_kind="N")] == ["N", "N"]
    assert "" not in read_nemo_csv(f, default_kind="N")[0].meta  # the leading column is pandas' row index
    with pytest.raises(DoriError, match="none of its 2 prompts has a reference image .no images_dir given"):
        load_control_set(f)
    _png(tmp_path / "imgs" / "7984.png")
    control = load_control_set(f, tmp_path / "imgs")  # only what can be attacked: the prompt with its image
    assert [(r.caption, r.kind, r.reference_status) for r in control] == [("Soaring by Peter Eades", "N", "ok")]
    text = tmp_path / "plain.txt"
    text.write_text("a photo\n")
    with pytest.raises(DoriError, match="none of its 1 prompts has a reference image"):
        load_control_set(text)
    again = tmp_path / "again.csv"  # a control caption that is also in the prompt set: one item for two
    again.write_text(";Caption;URL;Index\n0;Soaring by Peter Eades;u;7984\n")
    with pytest.raises(DoriError, match="'Soaring by Peter Eades' is listed twice, or is also in the prompt set"):
        load_control_set(again, tmp_path / "imgs", prompt_set=control)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(NEMO_HEADER + "The Colosseum;u;VM;0.9;0.95;17\nA field;u;N;0.1;0.1;18\n")
    assert [r.kind for r in read_nemo_csv(mixed)] == ["VM", "N"]
    with pytest.raises(DoriError, match="1 row.s. are of a memorized kind .VM, e.g. 'The Colosseum'"):
        load_control_set(mixed, tmp_path / "imgs")
    import dori.data.prompts as prompts  # a control kind is kept, any other non-memorized kind becomes N

    made = [prompts.PromptRecord(c, k, reference="x.png", reference_status="ok") for c, k in
            (("a", "held_out"), ("b", "unseen"), ("c", "unknown"))]
    monkeypatch.setattr(prompts, "load_prompt_set", lambda *a, **k: made)
    assert [r.kind for r in load_control_set("any")] == ["held_out", "N", "N"] and made[1].kind == "unseen"


def test_nemo_csv_bad_type(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text(NEMO_HEADER + "x;u;ZZ;0;0;1\n")
    with pytest.raises(DoriError, match="row 2 has type 'ZZ'"):
        read_nemo_csv(f)


def test_wen_jsonl_reads_gt_images_folder(tmp_path):
    f = tmp_path / "wen.jsonl"
    f.write_text("\n".join(json.dumps({"caption": f"c{i}", "index": i, "url": "u"}) for i in range(3)) + "\n")
    _png(tmp_path / "gt_images" / "1" / "0.png")
    recs = read_wen_jsonl(f)
    assert [r.reference_status for r in recs] == ["missing", "ok", "missing"]


def test_wen_jsonl_malformed_line(tmp_path):
    f = tmp_path / "wen.jsonl"
    f.write_text('{"caption": "a", "index": 0}\n{oops\n')
    with pytest.raises(DoriError, match="line 2 is not valid JSON"):
        load_prompt_set(f)


def test_webster_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "w.parquet"
    pq.write_table(pa.table({"caption": ["a", "b"], "url": ["u", "v"], "overfit_type": ["MV", "N"],
                             "gen_seeds": [[1, 2], [3]]}), f)
    recs = read_webster_parquet(f)
    assert [r.kind for r in recs] == ["MV", "N"] and recs[0].memorized and not recs[1].memorized
    assert recs[0].meta["gen_seeds"] == [1, 2]


def test_plain_text(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\nfirst prompt\n\nsecond prompt\n")
    assert [r.caption for r in read_text(f)] == ["first prompt", "second prompt"]


def test_empty_or_unknown_files(tmp_path):
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(DoriError, match="holds no prompts"):
        load_prompt_set(tmp_path / "e.txt")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DoriError, match="unknown prompt file type"):
        load_prompt_set(tmp_path / "x.xml")
    with pytest.raises(DoriError, match="Did you mean 'tiny'"):
        load_prompt_set("tinyy")


def test_tiny_prompt_set():
    recs = load_prompt_set("tiny")
    kinds = [r.kind for r in recs]
    assert kinds.count("memorized") >= 8
    assert {"seen_once", "held_out", "procedural", "unseen"} <= set(kinds)
    for r in recs:
        if r.reference_status == "ok":
            assert load_reference(r).shape == (3, 32, 32)
    captions = [r.caption for r in recs]
    assert len(set(captions)) == len(captions)


def test_tiny_sets_are_disjoint_and_held_out_never_trained():
    from dori.zoo.tiny_data import TinyDataSpec, build_train_set

    spec = TinyDataSpec(n_procedural=20)
    train = build_train_set(spec)
    held = [r for r in load_prompt_set("tiny") if r.kind == "held_out"]
    assert not {r.caption for r in held} & set(train.captions)
    held_imgs = torch.stack([load_reference(r) for r in held])
    # no training image equals a held-out photo
    d = (train.images[:, None] - held_imgs[None]).abs().flatten(2).mean(-1)
    assert d.min() > 0.02
