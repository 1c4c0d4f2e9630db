"""QLoRA through bitsandbytes on the CPU: 8-bit and nf4 base weights, LoRA adapters trained, through a
rollout -> update -> rollout -> update cycle (the eval-mode 4-bit trap would fail the second update)."""

import pytest
import torch
from textrl.envs.toy import char_tokenizer, tiny_gpt2

from textrl.cli import resolve_train_config
from textrl.loop import loop
from textrl.train import make_run


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_embd=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_qlora_trains_through_two_cycles(tmp_path, saved_tiny, kind):
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--model", str(saved_tiny), "--lora-r", "4",
                                   "--quantization", kind, "--total-steps", "512", "--output-dir", str(tmp_path)])
    run = make_run(cfg, quiet=True)
    seen = {"policy": run.policy,
            "base0": {k: v.clone() for k, v in run.policy.lm.get_base_model().state_dict().items() if "lora_" not in k}}
    result = loop(run)
    policy = seen["policy"]
    layer = policy.lm.get_base_model().transformer.h[0].attn.c_attn.base_layer
    assert type(layer).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
    assert policy.lm.training  # QLoRA stays in train mode (dropout is 0)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["losses/policy"])) for h in result.history)
    assert result.history[-1]["policy/kl_ref"] != 0  # the adapters moved the policy off the reference
    for k, v in policy.lm.get_base_model().state_dict().items():
        if k in seen["base0"] and v.dtype.is_floating_point is False:
            assert torch.equal(v, seen["base0"][k]), k  # quantised base weights untouched


def test_quantization_without_lora_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs LoRA adapters to train: set lora_r > 0"):
        resolve_train_config(["--env", "textrl/TargetToken-v0", "--quantization", "4bit", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="quantization must be"):
        resolve_train_config(["--env", "textrl/TargetToken-v0", "--quantization", "3bit", "--lora-r", "4"])
