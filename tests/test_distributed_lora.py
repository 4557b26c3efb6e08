"""LoRA under ZeRO-3 on 2 CPU ranks (real deepspeed launcher): SGA and TAU with --lora_r 8."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.models import load_causal_lm
from ds_unlearn.core.scorer import score_sequences

from .launcher import tail
from .test_distributed_unlearn import ds_args, run_ok
from .test_lora import digest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PREFIX = "base_model.model."


def test_zero3_sga_lora_trains_only_the_adapters(unlearn_case, tmp_path):
    before = digest(unlearn_case["model"])
    out = tmp_path / "sga"
    run_ok(*ds_args(unlearn_case, out, "zero3", "--method", "sga", "--lora_r", 8, "--learning_rate", "1e-2"))
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["settings"]["lora"]["r"] == 8
    assert report["before"]["memorized"] == 4 and report["after"]["memorized"] == 0, report["stop_reason"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # peft's Llama default
    state = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in state) and not (out / "model").exists()
    assert digest(unlearn_case["model"]) == before


def test_zero3_tau_lora_output_is_the_dense_edit(unlearn_case, tmp_path):
    before = digest(unlearn_case["model"])
    out = tmp_path / "tau"
    # lambda 2 (TAU's default is 1): at 1 the last sequence ended at MA 0.565 against the 0.6 threshold,
    # and one clean CI run hit the epoch limit with it just above; at 2 every MA ends <= 0.31.
    args = ("--method", "tau", "--lora_r", 8, "--learning_rate", "1e-2", "--tv_switch_ma", "0.7")
    args = (*args, "--tv_coefficient", "2", "--merge_adapter")
    result = run_ok(*ds_args(unlearn_case, out, "zero3", *args))
    report = json.loads((out / "report.json").read_text())
    assert report["switched_to_task_vector_at_epoch"] is not None, tail(result)
    assert report["after"]["memorized"] == 0, report["stop_reason"]
    assert digest(unlearn_case["model"]) == before

    # The dense formula, independently: W0 + D_s - lambda (D_n - D_s), D = (alpha / r) B A.
    base_cfg = json.loads((out / "tv_base_adapter" / "adapter_config.json").read_text())
    scaling, lam = base_cfg["lora_alpha"] / base_cfg["r"], report["settings"]["tv_coefficient"]
    s_state = load_file(out / "tv_base_adapter" / "adapter_model.safetensors")
    n_state = load_file(out / "tv_trained_adapter" / "adapter_model.safetensors")
    w0 = load_file(unlearn_case["model"] / "model.safetensors")
    merged = load_file(out / "model" / "model.safetensors")
    expected = dict(w0)
    for key in (k for k in s_state if k.endswith(".lora_A.weight")):
        b = key.replace(".lora_A.", ".lora_B.")
        d_s, d_n = scaling * s_state[b] @ s_state[key], scaling * n_state[b] @ n_state[key]
        name = key[len(PREFIX) : -len(".lora_A.weight")] + ".weight"
        expected[name] = w0[name] + d_s - lam * (d_n - d_s)
    assert len(s_state) == 8  # q_proj, v_proj x 2 layers x (A, B)
    assert set(merged) == set(w0)
    assert max((merged[k] - expected[k]).abs().max().item() for k in w0) < 1e-5
    assert any((merged[k] != w0[k]).any() for k in w0)

    # The output adapter (rank 2r) on the base scores as the merged checkpoint, and as the run's own scores.
    from peft import PeftModel

    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16
    forget = [r["input_ids"] for r in read_jsonl(unlearn_case["forget"])]
    peft_model = PeftModel.from_pretrained(load_causal_lm(unlearn_case["model"]), out / "adapter").eval()
    with torch.no_grad():
        adapter_scores = score_sequences(peft_model, forget, extract_k=(8,))
        merged_scores = score_sequences(load_causal_lm(out / "model").eval(), forget, extract_k=(8,))
    run_scores = read_jsonl(out / "scores_after.jsonl")
    for a, m, r in zip(adapter_scores, merged_scores, run_scores):
        assert a["ma"] == m["ma"] == pytest.approx(r["ma"])
        assert a["loss"] == pytest.approx(m["loss"], abs=1e-5) and a["loss"] == pytest.approx(r["loss"], abs=1e-4)

    # score --adapter on the base gives the merged checkpoint's file.
    args = ["--data", unlearn_case["forget"], "--extract_k", "8"]
    assert (
        main(
            [
                "score",
                "--model",
                str(unlearn_case["model"]),
                "--adapter",
                str(out / "adapter"),
                *map(str, args),
                "--out",
                str(tmp_path / "a.jsonl"),
            ]
        )
        == 0
    )
    assert main(["score", "--model", str(out / "model"), *map(str, args), "--out", str(tmp_path / "m.jsonl")]) == 0
    for a, m in zip(read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "m.jsonl")):
        assert a["ma"] == m["ma"] and a["loss"] == pytest.approx(m["loss"], abs=1e-5)
