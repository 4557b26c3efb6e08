"""UnlearnConfig: every shipped YAML parses, flags override YAML, bad settings fail in one line."""

import subprocess
import sys

import pytest

from ds_unlearn.commands.unlearn import parse_config
from ds_unlearn.core.errors import InputError
from ds_unlearn.unlearn.config import UnlearnConfig

from .conftest import REPO

PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))


def test_there_is_a_paper_config_per_model_and_method():
    names = {p.stem for p in PAPER}
    assert names == {
        f"gpt_neo_{s}_{m}" for s in ("125m", "1_3b", "2_7b") for m in ("ga", "sga", "ta", "tau", "graddiff", "npo")
    }


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_parse_and_open_with_their_command(path):
    assert path.read_text().startswith(f"# deepspeed --num_gpus 8 launch/unlearn.py --config configs/paper/{path.name}")
    config = parse_config(["--config", str(path), "--bf16", "false"])  # bf16 needs an accelerator here
    assert isinstance(config, UnlearnConfig)
    assert config.method == path.stem.rsplit("_", 1)[1]
    assert config.learning_rate == pytest.approx(5e-5) and config.adam_beta2 == pytest.approx(0.98)
    assert config.stop_rule == "mean" and 0.29 < config.mean_threshold < 0.35
    if config.method in ("ta", "tau"):
        assert config.tv_coefficient == {"ta": 3.0, "tau": 1.0}[config.method]
    if config.method in ("graddiff", "npo"):
        assert config.retain and config.retain_weight == 1.0 and config.uses_retain
    if config.method == "npo":
        assert config.npo_beta == pytest.approx(0.1)


def test_flags_override_yaml_and_defaults_follow_the_method(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nforget: f.jsonl\nmethod: tau\nlearning_rate: 1.0e-4\noutput_dir: o\n")
    config = parse_config(["--config", str(cfg), "--learning_rate", "2e-4"])
    assert config.learning_rate == pytest.approx(2e-4)
    assert (config.tv_coefficient, config.tv_switch_ma) == (1.0, 0.5)
    assert config.remove_unused_columns is False and config.report_to == ["tensorboard"]
    assert config.stop_rule == "per_sequence" and config.calibrate_thresholds is False  # tau, no holdout


def test_band_is_the_default_rule_of_sga_and_the_retain_methods_and_holdouts_calibrate(tmp_path):
    def config(**kw):
        return UnlearnConfig(model="m", forget="f", output_dir=str(tmp_path / "o"), **kw)

    assert config(method="sga").stop_rule == "band" and config(method="sga").max_over_unlearned == 0
    assert config(method="npo").stop_rule == "band" and not config(method="npo").uses_retain
    assert config(method="kl", retain="r").stop_rule == "band" and config(method="kl", retain="r").uses_retain
    assert config(method="ga").stop_rule == "per_sequence"
    assert config(method="sga", stop_rule="mean", mean_threshold=0.3).stop_rule == "mean"
    assert config(holdout="h").calibrate_thresholds is True and config().calibrate_thresholds is False
    assert config(holdout="h", calibrate_thresholds=False).calibrate_thresholds is False


@pytest.mark.parametrize(
    "yaml_text, flags, message",
    [
        ("model: m\nforget: f\nlr: 1\n", [], "unknown key 'lr'"),
        ("model: m\nforget: f\nmethod: dpo\n", [], "method: must be one of ga, sga, ta, tau, graddiff, npo, kl"),
        ("model: m\nforget: f\nmethod: graddiff\n", [], "retain: method graddiff trains on the retain set"),
        ("model: m\nforget: f\nmethod: npo\nnpo_beta: 0\n", [], "npo_beta: must be positive"),
        ("model: m\nforget: f\n", ["--stop_rule", "both"], "stop_rule: must be one of band, per_sequence, mean"),
        ("model: m\nforget: f\n", ["--max_over_unlearned", "-1"], "max_over_unlearned: must be 0 or more"),
        ("model: m\nforget: f\n", ["--min_lr_fraction", "0"], "min_lr_fraction: must lie in"),
        (
            "model: m\nforget: f\n",
            ["--select_on", "el10", "--score_refresh", "step"],
            "select_on: el10 needs score_refresh=epoch",
        ),
        ("model: m\nforget: f\nstop_rule: mean\n", [], "mean_threshold: the 'mean' stop rule needs"),
        ("model: m\nforget: f\n", ["--calibrate_thresholds", "true"], "calibrate_thresholds: needs a holdout"),
        ("model: m\nforget: f\n", ["--memorized_threshold", "0.1"], "memorized_threshold: need 0 <="),
        ("forget: f\n", [], "model: required"),
        ("model: m\nforget: f\nmethod: ga\ntv_coefficient: 2\n", [], "tv_coefficient: only applies to ta/tau"),
        ("- just\n- a list\n", [], "must hold a mapping"),
        ("model: m\nforget: f\nmethod: match\n", [], "match_holdout: method match drives the forget set"),
        ("model: m\nforget: f\nholdout: h\nmethod: match\nmatch_margin: 0.5\n", [], "match_margin: must lie in"),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\n",
            ["--match_z_quantile", "1"],
            "match_z_quantile: must lie in",
        ),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\n",
            ["--match_targets_under", "retrained"],
            "match_targets_under: must be 'input' or 'current'",
        ),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\nmatch_target: tokens\n",
            ["--match_targets_under", "current"],
            "match_targets_under: 'current' needs match_target loss",
        ),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\n",
            ["--match_entropy_quantile", "-0.1"],
            "match_entropy_quantile",
        ),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\nmatch_target: logits\n",
            [],
            "match_target: must be one of loss, tokens",
        ),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\nmatch_retain: ascend\n",
            [],
            "match_retain: must be 'descend'",
        ),
        ("model: m\nforget: f\nholdout: h\nmethod: ga\nmatch_retain: kl\n", [], "match_retain"),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\nmatch_target: reference\n",
            [],
            "match_target: .reference. distils the forget rows toward a model that never saw them: pass (--)?reference",
        ),
        ("model: m\nforget: f\nstop_rule: match\n", [], "stop_rule: 'match' judges the match method's targets"),
        (
            "model: m\nforget: f\nholdout: h\nmethod: match\n",
            ["--score_refresh", "step"],
            "score_refresh: method match plans each epoch",
        ),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path, yaml_text, flags, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(InputError, match=message):
        parse_config(["--config", str(cfg), "--output_dir", str(tmp_path / "o"), *flags])


def test_cli_reports_a_bad_config_in_one_line_with_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: m\nforget: f\nlearning_rat: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "ds_unlearn", "unlearn", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "unknown key 'learning_rat'" in lines[0]
    assert not (tmp_path / "o").exists()


def test_import_and_config_construction_have_no_side_effects(tmp_path):
    # A notebook user builds a DeepSpeed config: no environment change, no Hub switch-off.
    # What the libraries below us set when imported (torch's dynamo sets TORCHINDUCTOR_CACHE_DIR)
    # is theirs: they are imported first, and from then on nothing of ours may change a variable.
    code = (
        "import os, json\n"
        "import torch._dynamo, transformers, deepspeed\n"
        "from transformers import Trainer, TrainingArguments\n"
        "before = dict(os.environ)\n"
        "import ds_unlearn\n"
        "for name in ds_unlearn.__all__: getattr(ds_unlearn, name)\n"
        "from ds_unlearn.unlearn.config import UnlearnConfig\n"
        f"UnlearnConfig(model='m', forget='f', output_dir={str(tmp_path)!r}, "
        f"deepspeed={str(REPO / 'configs/ds/zero2.json')!r})\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(json.dumps(changed))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    changed = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert changed == [], changed


def test_a_checkpoint_resumes_only_under_the_launch_that_wrote_it(tmp_path):
    """Its run state is one shard per rank and, under DeepSpeed, its optimizer is partitioned over
    those ranks: resuming it any other way would fail after the model loads, with a traceback."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "unlearn_state.json").write_text("{}")
    base = ["--model", "m", "--forget", "f", "--output_dir", str(tmp_path / "o")]
    resume = [*base, "--resume_from_checkpoint", str(checkpoint)]
    with pytest.raises(InputError, match=r"checkpoint-3 has no unlearn_shards_rank\*\.pt"):
        parse_config(resume).check_files()
    (checkpoint / "unlearn_shards_rank0.pt").write_bytes(b"")
    resumed = parse_config(resume)
    resumed.check_files()  # 1 rank, no DeepSpeed: as saved
    assert resumed.resume_from_checkpoint == str(checkpoint)
    (checkpoint / "unlearn_state.json").write_text('{"epochs": 3}')
    with pytest.raises(InputError, match="num_train_epochs: .*checkpoint-3 already ran 3 epochs: pass more than 3"):
        parse_config([*resume, "--num_train_epochs", "3"]).check_files()
    more = parse_config([*resume, "--num_train_epochs", "4"])
    more.check_files()
    assert more.num_train_epochs == 4
    (checkpoint / "global_step3").mkdir()
    with pytest.raises(
        InputError,
        match="was saved by 1 rank with DeepSpeed and this run has 1 rank without DeepSpeed; resume it the way",
    ):
        parse_config(resume).check_files()
    (checkpoint / "unlearn_shards_rank1.pt").write_bytes(b"")
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    with pytest.raises(InputError, match="saved by 2 ranks with DeepSpeed and this run has 1 rank with DeepSpeed"):
        parse_config([*resume, "--deepspeed", str(ds)]).check_files()


def test_yaml_values_are_checked_against_the_field_types(tmp_path):
    from ds_unlearn.commands.memorize import parse_config as parse_lab

    config = tmp_path / "lab.yaml"
    for text, message in [
        ("local_prefix_ks: 3\n", "key 'local_prefix_ks': expected a list of integers, got 3"),
        ("local_prefix_ks: [3, 4.5]\n", "key 'local_prefix_ks': expected a list of integers, got [3, 4.5]"),
        ("string_length: 8.5\n", "key 'string_length': expected an integer, got 8.5"),
        ("save_model: 1\n", "key 'save_model': expected true or false, got 1"),
    ]:
        config.write_text(text)
        with pytest.raises(InputError) as caught:
            parse_lab(["--config", str(config), "--model", "smollm2", "--output_dir", str(tmp_path / "o")])
        assert str(caught.value) == f"--config: {config}: {message}"
    # What fits passes: an int where a float goes, a list of ints, a string argparse converts.
    config.write_text("learning_rate: 1\nlocal_prefix_ks: [3, 4]\nepochs: '6'\nexperiment: [local_prefix]\n")
    lab = parse_lab(["--config", str(config), "--model", "smollm2", "--output_dir", str(tmp_path / "o")])
    assert (lab.learning_rate, lab.local_prefix_ks, lab.epochs) == (1, [3, 4], 6)


def test_building_a_config_reads_no_file_and_the_run_checks_what_it_names(tmp_path):
    """Paths the settings name (companion models, the adapter, the checkpoint to resume, sets
    against the forget file) are checked by ``check_files`` when the run starts, not when the
    config is built: a config can be built, compared and written before its files exist."""
    missing = tmp_path / "missing"
    config = UnlearnConfig(
        model="m",
        forget="f.jsonl",
        holdout="h.jsonl",
        output_dir=str(tmp_path / "o"),
        retrained=str(missing / "retrained"),
        adapter=str(missing / "adapter"),
        resume_from_checkpoint=str(missing / "checkpoint-1"),
    )
    assert not missing.exists() and not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="^retrained: .* is not a model directory"):
        config.check_files()
    config.retrained = None
    with pytest.raises(InputError, match="^resume_from_checkpoint: .* is not a checkpoint of an unlearning run"):
        config.check_files()
    config.resume_from_checkpoint = None
    with pytest.raises(InputError, match="^adapter: .* is not a peft adapter directory"):
        config.check_files()
    config.adapter, config.holdout = None, "f.jsonl"
    with pytest.raises(InputError, match="^holdout: is the forget set's own file"):
        config.check_files()


def test_every_method_is_declared_once_and_the_config_follows_its_declaration(tmp_path):
    """One entry per method (unlearn/methods.py): its loss terms exist, the settings it names
    are config fields, and the config's defaults and refusals come from the entry."""
    from dataclasses import fields

    from ds_unlearn.unlearn import losses
    from ds_unlearn.unlearn.losses import TERMS
    from ds_unlearn.unlearn.methods import METHOD_SETTINGS, METHODS

    names = {f.name for f in fields(UnlearnConfig)}
    for method in METHODS.values():
        assert method.forget_term in TERMS and method.retain_term in (*TERMS, None), method.name
        assert set(method.settings) <= names, method.name
        assert all(hasattr(losses, f) for f in method.loss.split(" + ")), method.loss
        config = UnlearnConfig(
            model="m", forget="f", retain="r", holdout="h", output_dir=str(tmp_path / "o"), method=method.name
        )
        assert config.stop_rule == method.stop_rule and config.selects == method.selects
        assert config.uses_retain == (method.retain_term is not None)
        if method.task_vector is not None:
            assert (config.tv_coefficient, config.tv_switch_ma) == method.task_vector
        # A setting another method reads is refused under this one, naming who reads it.
        for setting in METHOD_SETTINGS:
            if setting in method.settings or setting in ("sga_gamma", "select_on", "tv_switch_ma"):
                continue
            value = {"tv_coefficient": 2.0}.get(setting, 0.5)
            readers = "/".join(m.name for m in METHODS.values() if setting in m.settings)
            with pytest.raises(InputError, match=f"^{setting}: only applies to {readers}, not {method.name}$"):
                UnlearnConfig(
                    model="m",
                    forget="f",
                    retain="r",
                    holdout="h",
                    output_dir=str(tmp_path / "o"),
                    method=method.name,
                    **{setting: value},
                )
