"""LoRA adapters: the task-vector edit on adapter deltas against dense math, merging, settings."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ds_unlearn.cli import main
from ds_unlearn.core.adapters import lora_delta, merge_into_checkpoint
from ds_unlearn.core.toy import save_model, tiny_model
from ds_unlearn.unlearn.lora import TRAINED, TV_BASE, AdapterEdit, edited_lora_factors, prepare_model

from .conftest import VOCAB, unlearn_args


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def dense_edit(w0, a_s, b_s, a_n, b_n, scaling, coefficient):
    """The edited weight by the issue's formula, straight: W0 + D_s - lambda (D_n - D_s)."""
    d_s, d_n = scaling * (b_s @ a_s), scaling * (b_n @ a_n)
    return w0 + d_s - coefficient * (d_n - d_s)


def test_edited_factors_are_the_dense_task_vector_edit():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 16, generator=g)
    a_s, a_n = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    b_s, b_n = torch.randn(24, 4, generator=g), torch.randn(24, 4, generator=g)
    for coefficient in (1.0, 3.0):
        a, b = edited_lora_factors(a_s, b_s, a_n, b_n, coefficient)
        assert a.shape == (8, 16) and b.shape == (24, 8)
        merged = w0 + lora_delta(a, b, 0.5)
        assert (merged - dense_edit(w0, a_s, b_s, a_n, b_n, 0.5, coefficient)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="do not match"):
        edited_lora_factors(a_s, b_s, a_n[:2], b_n, 1.0)


def lora_settings(method="tau", **kw):
    values = dict(
        adapter=None, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=None, method=method, tv_coefficient=1.0
    )
    return SimpleNamespace(**{**values, **kw})


def test_adapter_scales_judge_exactly_the_dense_edit():
    """AdapterEdit.on(): the forward of W0 + (1+l) D_s - l D_n on every adapted layer, without
    touching W0; off(): the trained adapter alone (tv_base at scale 0)."""
    torch.manual_seed(0)
    base = tiny_model("llama", seed=3, vocab_size=VOCAB)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = prepare_model(tiny_model("llama", seed=3, vocab_size=VOCAB), lora_settings())
    assert all(".default." in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # distinct random adapter states (B starts at zero in peft)
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.1 * torch.randn_like(param))
    coefficient = 3.0
    edit = AdapterEdit(model, coefficient)
    ids = torch.randint(1, VOCAB, (2, 12))
    params = dict(model.named_parameters())
    expected_on, expected_off = dict(w0), dict(w0)
    for name in (n for n in params if n.endswith(f"lora_A.{TRAINED}.weight")):
        module = name[len("base_model.model.") : -len(f".lora_A.{TRAINED}.weight")]
        a_n, b_n, a_s, b_s = (
            params[f"base_model.model.{module}.lora_{which}.{adapter}.weight"].detach()
            for adapter in (TRAINED, TV_BASE)
            for which in ("A", "B")
        )
        w = w0[f"{module}.weight"]
        expected_on[f"{module}.weight"] = dense_edit(w, a_s, b_s, a_n, b_n, 2.0, coefficient)
        expected_off[f"{module}.weight"] = w + 2.0 * b_n @ a_n
    model.eval()
    for switch, expected in ((edit.on, expected_on), (edit.off, expected_off)):
        switch()
        base.load_state_dict(expected)
        with torch.no_grad():
            assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() < 1e-5


def test_merge_into_checkpoint_matches_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    save_model(tiny_model("gpt_neo", seed=4, vocab_size=VOCAB), tmp_path / "base")
    model = get_peft_model(tiny_model("gpt_neo", seed=4, vocab_size=VOCAB), LoraConfig(r=4, lora_alpha=16))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "adapter")
    merge_into_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    base = tiny_model("gpt_neo", seed=4, vocab_size=VOCAB)
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    assert set(ours) <= set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    assert any((ours[k] != load_file(tmp_path / "base" / "model.safetensors")[k]).any() for k in ours)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_r", "-1"], "lora_r: must be a positive rank"),
        (["--lora_alpha", "8"], "lora_alpha: only applies with LoRA"),
        (["--merge_adapter", "true"], "merge_adapter: only applies with LoRA"),
        (["--lora_r", "4", "--lora_target_modules", "no_such_proj"], "lora_target_modules: Target modules"),
        (["--lora_r", "4", "--lora_dropout", "1.5"], "lora_dropout: must lie in [0, 1)"),
        (lambda c: ["--adapter", c["model"]], "is not a peft adapter directory"),
    ],
)
def test_lora_settings_that_do_not_fit_are_one_line_and_write_nothing(extra, message, unlearn_case, tmp_path, capsys):
    extra = extra(unlearn_case) if callable(extra) else extra
    before = digest(unlearn_case["model"])
    out = tmp_path / "out"
    code = main(["unlearn", *unlearn_args(unlearn_case, out, "--method", "tau", *extra)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and digest(unlearn_case["model"]) == before


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage, precision", [(2, "bf16"), (3, "bf16"), (3, "fp32")])
def test_adapter_edit_under_zero(stage, precision, tmp_path):
    from .launcher import deepspeed_run, tail

    out = tmp_path / "result.json"
    result = deepspeed_run("tests/scripts/lora_edit_check.py", stage, precision, out, timeout=420)
    assert result.returncode == 0, tail(result)
    r = json.loads(out.read_text())
    assert r["kind"] == ("zero3" if stage == 3 else "fragments") and r["only_adapters"], r
    assert r["moved"] > 1e-3 and r["tv_base_vs_rounded_masters"] == 0.0, r
    # bf16 forward passes round every activation; fp32 agrees to float precision.
    assert r["edited_vs_dense_logits"] < (5e-2 if precision == "bf16" else 1e-4), r


def test_demo_lora_reruns_the_best_method_with_adapters(tmp_path):
    from ds_unlearn.core.summary import Thresholds
    from ds_unlearn.core.toy import tiny_config
    from ds_unlearn.demo.run import lora_method, settings_for, unlearn_config

    for name in ("planted", "retrained"):  # the configs name both checkpoints (checked when built)
        tiny_config("llama", vocab_size=64).save_pretrained(tmp_path / name / "model")
    settings = settings_for(True, lora_r=8, methods=("ga", "sga"))
    assert lora_method(settings) == "sga" and lora_method(settings_for(True, lora_r=8)) == "tau"
    config = unlearn_config("sga", tmp_path, settings, False, Thresholds(), lora=True)
    assert config.lora_r == 8 and config.output_dir == str(tmp_path / "sga_lora")
    assert config.learning_rate == pytest.approx(settings.unlearn_lr * settings.lora_lr_factor)
    plain = unlearn_config("sga", tmp_path, settings, False, Thresholds())
    assert plain.lora_r == 0 and plain.learning_rate == settings.unlearn_lr
