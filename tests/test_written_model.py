"""The model a run writes is the model it judged (the end-of-run guard), whatever the
adapter, and no fault loses a byte. Every test runs the real ``ds-unlearn unlearn`` command."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from ds_unlearn.cli import main
from ds_unlearn.core.files import LOCK_NAME, read_jsonl
from ds_unlearn.core.models import load_causal_lm
from ds_unlearn.core.scorer import score_sequences
from ds_unlearn.core.toy import save_model, tiny_model

from .conftest import VOCAB, unlearn_args
from .test_lora import digest
from .test_output_lock import hold


def make_adapter(path, base_dir, *, seed=0, **lora):
    """A trained-looking peft adapter (small random non-zero LoRA factors; modules_to_save copies as
    peft makes them) on the checkpoint ``base_dir``: the base's memorization survives it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def peft_scores(base_dir, adapter_dir, forget):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return score_sequences(model, forget, el_n=(), extract_k=(8,))


def assert_written_is_judged(case, out):
    """What a user loads from ``out`` scores as the run's own scores_after.jsonl, and the guard said so."""
    report = json.loads((out / "report.json").read_text())
    assert report["guard"]["ok"] and report["guard"]["max_abs_loss_diff"] < 1e-4, report["guard"]
    forget = [r["input_ids"] for r in read_jsonl(case["forget"])]
    run = read_jsonl(out / "scores_after.jsonl")
    written = {"adapter": peft_scores(case["model"], out / "adapter", forget)} if (out / "adapter").is_dir() else {}
    if (out / "model").is_dir():
        written["model"] = score_sequences(load_causal_lm(out / "model").eval(), forget, el_n=(), extract_k=(8,))
    assert sorted(written) == sorted(report["guard"]["checked"])
    for scores in written.values():
        for w, r in zip(scores, run):
            assert w["ma"] == pytest.approx(r["ma"]) and w["loss"] == pytest.approx(r["loss"], abs=1e-4)
    return report


def test_embedding_lora_and_modules_to_save_are_written_whole(unlearn_case, tmp_path):
    """Kind 1: an adapter on the embedding (lora_embedding_A/B) with a trained lm_head copy
    (modules_to_save): every tensor peft saves is written, the merge applies them, the guard agrees."""
    adapter = make_adapter(
        tmp_path / "in_adapter",
        unlearn_case["model"],
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )
    out = tmp_path / "out"
    args = ["--adapter", adapter, "--method", "ga", "--merge_adapter", "true", "--num_train_epochs", 3]
    assert main(["unlearn", *unlearn_args(unlearn_case, out, *args)]) == 0
    state = load_file(out / "adapter" / "adapter_model.safetensors")
    saved_by_peft = {k for k in load_file(adapter / "adapter_model.safetensors") if ".base_layer." not in k}
    assert set(state) == saved_by_peft  # what peft saves but the frozen base embedding (the input has it)
    assert (
        "base_model.model.model.embed_tokens.lora_embedding_A" in state and "base_model.model.lm_head.weight" in state
    )
    assert not (
        state["base_model.model.lm_head.weight"]
        == load_file(adapter / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    ).all()  # the copy trained, and the trained copy was written
    assert_written_is_judged(unlearn_case, out)


def rslora_tau(case, tmp_path, out):
    adapter = make_adapter(
        tmp_path / "rs_adapter",
        case["model"],
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
    )
    args = ["--adapter", adapter, "--method", "tau", "--learning_rate", "1e-2", "--tv_switch_ma", "0.7"]
    args += ["--tv_coefficient", "2", "--merge_adapter", "true"]
    return main(["unlearn", *unlearn_args(case, out, *args)])


def test_rslora_tau_edited_adapter_is_the_judged_edit(unlearn_case, tmp_path):
    """Kind 2: under rsLoRA the rank-2r edited adapter keeps peft's scale alpha/sqrt(r) (a doubled
    alpha would scale it by sqrt(2) too much); embeddings are edited too."""
    out = tmp_path / "out"
    assert rslora_tau(unlearn_case, tmp_path, out) == 0
    report = assert_written_is_judged(unlearn_case, out)
    assert report["switched_to_task_vector_at_epoch"] is not None
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_rslora"] and config["lora_alpha"] / 8**0.5 == pytest.approx(8 / 4**0.5)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in load_file(
        out / "adapter" / "adapter_model.safetensors"
    )


def test_guard_fails_loudly_when_the_written_model_is_not_the_judged_one(unlearn_case, tmp_path, monkeypatch, capsys):
    """The guard: today's rsLoRA rule (alpha doubled) written back in makes the written adapter
    differ from the judged edit: exit 1, the sequence and both values named, report.json says so."""
    from ds_unlearn.unlearn import lora

    monkeypatch.setattr(lora, "edited_alpha", lambda config, scaling: 2 * config.lora_alpha)
    out = tmp_path / "out"
    assert rslora_tau(unlearn_case, tmp_path, out) == 1
    guard = json.loads((out / "report.json").read_text())["guard"]
    assert not guard["ok"] and guard["sequence"].startswith("forget-"), guard
    err = capsys.readouterr().err
    assert f"forget sequence '{guard['sequence']}'" in err and "as written" in err and "as judged" in err


@pytest.mark.parametrize("lora", [False, True])
def test_seed_makes_two_runs_bit_identical(lora, unlearn_case, tmp_path):
    """Kind 3: --seed is set before the model and its adapters are built, so two identical runs
    in one process (the RNG already consumed by the first) write the same bytes."""
    extra = ["--method", "ga", "--num_train_epochs", 2] + (["--lora_r", 4, "--lora_dropout", "0.1"] if lora else [])
    written = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    digests = []
    for name in ("a", "b"):
        torch.manual_seed(1000 + len(name) * ord(name))  # a different global RNG state before each
        assert main(["unlearn", *unlearn_args(unlearn_case, tmp_path / name, *extra)]) in (0, 1)
        digests.append((tmp_path / name / written).read_bytes())
    assert digests[0] == digests[1]


def test_resume_under_other_settings_is_one_line(unlearn_case, tmp_path, capsys):
    """Kind 4: a checkpoint resumes only under the method and LoRA setting (and precision, which a
    CPU cannot vary) that wrote it; ZeRO stages: test_distributed_written_model.py."""
    out = tmp_path / "out"
    first = ["--method", "ga", "--learning_rate", "1e-7", "--num_train_epochs", 1]
    assert main(["unlearn", *unlearn_args(unlearn_case, out, *first)]) in (0, 1)
    checkpoint = next(out.glob("checkpoint-*"))
    before = digest(out)
    capsys.readouterr()
    resume = ["--num_train_epochs", 2, "--resume_from_checkpoint", checkpoint]
    for extra, what in (
        (["--method", "ga", "--lora_r", 4], "LoRA off and this run has LoRA r=4"),
        (["--method", "npo"], "method ga and this run has method npo"),
    ):
        code = main(["unlearn", *unlearn_args(unlearn_case, out, "--learning_rate", "1e-7", *extra, *resume)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and what in err[0], err
    assert digest(out) == before


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def fill(disk):
    """Fill ``disk`` to its last byte."""
    try:
        with open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


@pytest.mark.parametrize("lora", [False, True])
def test_disk_full_while_saving_leaves_nothing_half_written(
    lora, tiny_disk, unlearn_case, tmp_path, monkeypatch, capsys
):
    """Faults: ENOSPC (a real full tmpfs) while writing model/ or adapter/: a clear error naming it,
    no half-written model (nothing under that name, no temporary left), earlier outputs and the
    input untouched."""
    from ds_unlearn.unlearn import run

    target = "adapter" if lora else "model"
    name = "save_adapters" if lora else "_save_full_model"
    real = getattr(run, name)

    def full_disk_then(*args, **kwargs):  # the disk fills up just as the model is written
        fill(tiny_disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, name, full_disk_then)
    before = digest(unlearn_case["model"])
    out = tiny_disk / "out"
    extra = ["--method", "ga", "--num_train_epochs", 1, "--save_resumable", "false", "--report_to", "none"]
    extra += ["--lora_r", 4] if lora else []
    assert main(["unlearn", *unlearn_args(unlearn_case, out, *extra)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [
        f"ds-unlearn unlearn: error: cannot write {out / target}: no space left on the device; nothing of it "
        "was kept (earlier outputs are untouched)"
    ], err
    assert not (out / target).exists() and not list(out.glob(".*partial*")), sorted(p.name for p in out.iterdir())
    assert [r["id"] for r in read_jsonl(out / "scores_before.jsonl")] == [f"forget-{i}" for i in range(4)]
    assert not (out / LOCK_NAME).exists()  # released
    assert digest(unlearn_case["model"]) == before


def test_second_run_into_a_locked_output_is_refused(unlearn_case, tmp_path, capsys):
    """Faults: a run holds its output folder's lock for its life; another is refused in one line."""
    out = tmp_path / "out"
    out.mkdir()
    holder = hold(out / LOCK_NAME)
    try:
        code = main(["unlearn", *unlearn_args(unlearn_case, out, "--method", "ga")])
    finally:
        holder.kill()
        holder.wait()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "is in use by another run" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def word_tokenizer(n_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(n_tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t1", pad_token="t0")


def test_inputs_that_do_not_fit_the_model_are_one_line(unlearn_case, tmp_path, capsys):
    """Faults: a tokenizer larger than the embedding, an adapter made for another base: exit 2,
    one line, nothing written, before compute."""
    model = tmp_path / "model"
    shutil.copytree(unlearn_case["model"], model)
    word_tokenizer(VOCAB + 36).save_pretrained(model)
    text = tmp_path / "forget.jsonl"
    text.write_text(
        "".join(json.dumps({"id": i, "text": " ".join(f"t{j}" for j in range(i, i + 20))}) + "\n" for i in range(4))
    )
    other = tmp_path / "other"
    save_model(tiny_model("llama", seed=5, vocab_size=VOCAB, hidden_size=48), other)
    foreign = make_adapter(tmp_path / "foreign", other, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    capsys.readouterr()
    cases = (
        (
            ["--model", model, "--forget", text, "--method", "ga"],
            "its tokenizer has 100 tokens but the model's embedding only 64",
        ),
        (["--adapter", foreign, "--method", "sga"], "was made for another model"),
    )
    for extra, message in cases:
        out = tmp_path / "out"
        code = main(["unlearn", *unlearn_args(unlearn_case, out, *extra)])  # the last --model/--forget wins
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not out.exists()
