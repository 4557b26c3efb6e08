"""TA/TAU on LoRA adapters on a real DeepSpeed engine (run by tests/test_lora.py under the
``deepspeed`` launcher, 2 CPU ranks): theta_base lands in the frozen adapter, the base stays
untouched, and the scale switch judges W0 + (1 + l) D_s - l D_n.

    deepspeed --num_accelerators 2 tests/scripts/lora_edit_check.py STAGE PRECISION OUT.json
"""

import json
import sys
from types import SimpleNamespace

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from ds_unlearn.commands import process
from ds_unlearn.core import distributed as D
from ds_unlearn.core.adapters import lora_delta
from ds_unlearn.core.toy import random_sequences, tiny_model
from ds_unlearn.unlearn.lora import TRAINED, TV_BASE, AdapterEdit, gather_adapters, prepare_model
from ds_unlearn.unlearn.weights import OwnedWeights

LAMBDA = 1.5


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stage, precision, out = int(args[0]), args[1], args[2]
    process.init_distributed()
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 64},
        "bf16": {"enabled": precision == "bf16"},
    }
    settings = SimpleNamespace(
        adapter=None, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=None, method="tau"
    )
    reference = tiny_model("llama", seed=0, vocab_size=64)
    w0 = {k: v.clone() for k, v in reference.state_dict().items()}
    model = prepare_model(tiny_model("llama", seed=0, vocab_size=64), settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    data = torch.tensor(random_sequences(2, 12, 64, seed=D.rank()))

    def step():
        engine.backward(engine(input_ids=data, labels=data).loss)
        engine.step()

    for _ in range(2):
        step()
    weights = OwnedWeights(engine.module)
    edit = AdapterEdit(engine.module, LAMBDA)
    base_masters = [safe_get_full_fp32_param(p).float().cpu().clone() for p in weights.params]
    edit.set_base(weights, weights.snapshot())
    for _ in range(3):
        step()
    states = gather_adapters(engine.module)
    dtype = weights.params[0].dtype
    names = [k for k in states[TRAINED]]  # parameters() order: as OwnedWeights walks them
    result = {
        "kind": weights.kind,
        "dtype": str(dtype),
        "only_adapters": all(".lora_" in n for n, p in engine.module.named_parameters() if p.requires_grad),
        "tv_base_vs_rounded_masters": max(
            float((states[TV_BASE][n] - m.to(dtype).float()).abs().max()) for n, m in zip(names, base_masters)
        ),
        "moved": max(float((states[TRAINED][n] - states[TV_BASE][n]).abs().max()) for n in names),
    }
    # The judged model against the dense formula on a plain fp32 model.
    expected = dict(w0)
    scaling = settings.lora_alpha / settings.lora_r
    for key in (k for k in names if k.endswith(".lora_A.weight")):
        b = key.replace(".lora_A.", ".lora_B.")
        d_s = lora_delta(states[TV_BASE][key], states[TV_BASE][b], scaling)
        d_n = lora_delta(states[TRAINED][key], states[TRAINED][b], scaling)
        name = key[len("base_model.model.") : -len(".lora_A.weight")] + ".weight"
        expected[name] = w0[name] + d_s - LAMBDA * (d_n - d_s)
    reference.load_state_dict(expected)
    ids = torch.tensor(random_sequences(2, 12, 64, seed=7))
    engine.module.eval()
    edit.on()
    with torch.no_grad():
        judged = engine.module(input_ids=ids).logits.float()
        result["edited_vs_dense_logits"] = float((judged - reference.eval()(input_ids=ids).logits).abs().max())
    edit.off()
    if D.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    process.finalize()


if __name__ == "__main__":
    main()
