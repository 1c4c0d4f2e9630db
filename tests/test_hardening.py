"""Hardening from the audit: dropout fully off (and a health check that would see it), the KL estimator a
reward may use, and bad values refused before anything loads, from the CLI, YAML and the Python API."""

import pytest
import torch
from textrl.envs.toy import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from textrl.cli import main
from textrl.config import TrainConfig
from textrl.lm.models import disable_dropout
from textrl.train import make_run


def test_attention_dropout_copied_into_llama_modules_is_switched_off_too():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_dropout=0.3)
    model = LlamaForCausalLM(cfg).train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert not torch.equal(model(ids).logits, model(ids).logits)  # (the attention module copied 0.3 at init)
    disable_dropout(model).train()
    assert model.config.attention_dropout == 0.0
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_the_health_check_sees_randomness_that_no_dropout_module_names(tmp_path):
    model = tiny_model()

    def noise(module, args, output):  # what a dropout hidden in a custom layer does in train mode
        return output + torch.rand_like(output) * 0.1 if module.training else output

    model.transformer.h[0].mlp.register_forward_hook(noise)
    run = make_run(TrainConfig(env="textrl/TargetToken-v0", num_envs=4, total_steps=64, output_dir=str(tmp_path)),
                   quiet=True, model=model)
    with pytest.raises(ValueError, match="dropout: two train-mode forwards of the policy on the same input differ"):
        run.start()
    run.close()


def test_a_k2_or_k3_kl_in_the_reward_is_refused_naming_why(tmp_path, capsys):
    argv = ["train", "--env", "textrl/TargetToken-v0", "--num-envs", "4", "--total-steps", "64"]
    assert main([*argv, "--kl-estimator", "k3", "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "kl_estimator='k3': ppo pays the KL penalty in the reward, and there only k1" in err
    assert "--kl-estimator k1" in err
    # a KL loss term (GRPO) may log any estimator
    assert main([*argv, "--agent", "grpo", "--kl-estimator", "k3", "--output-dir", str(tmp_path / "b")]) == 0


TOY = ["train", "--env", "textrl/TargetToken-v0", "--num-envs", "4", "--total-steps", "64"]
CARTPOLE = ["train", "--env", "CartPole-v1", "--total-steps", "256"]


@pytest.mark.parametrize("argv, says", [
    (TOY + ["--num-envs", "2.5"], "num_envs: expected int, got '2.5'"),
    (TOY + ["--total-steps", "1.5"], "total_steps: expected int, got '1.5'"),
    (CARTPOLE + ["--hidden-sizes", "0"], "hidden_sizes must be one or more positive integers"),
    (CARTPOLE + ["--hidden-sizes", "-4"], "hidden_sizes must be one or more positive integers"),
    (TOY + ["--model", "no-such-model"], "model: 'no-such-model' is neither a local folder nor in the Hugging Face cache"),
    (TOY + ["--model", "/no/such/folder"], "model: '/no/such/folder' is not a folder that exists"),
    (TOY + ["--value-model", "/no/such/path"], "value_model: '/no/such/path' is not a folder that exists"),
    (TOY + ["--reward-model", "./nothing/here"], "reward_model: './nothing/here' is not a folder that exists"),
    (TOY + ["--env-kwargs", "{a: [1, 2"], "env_kwargs: not valid YAML"),
    (TOY + ["--temperature", "inf"], "temperature must be a finite number > 0, got inf"),
    (TOY + ["--vf-coef", "nan"], "vf_coef must be a finite number >= 0, got nan"),
    (TOY + ["--ag", "grpo"], "unrecognized arguments: --ag"),
    (["eval", "--env", "textrl/Arithmetic-v0", "--model", "/no/such/model"], "model: '/no/such/model' is not a folder"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
def test_bad_values_are_refused_before_anything_loads_naming_the_field(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = ["--output-dir", str(tmp_path / "run")] if argv[0] == "train" else []
    try:
        rc = main([*argv, *out])
    except SystemExit as stop:  # (argparse's own errors: a value its type cannot parse, an unknown flag)
        rc = stop.code
    assert rc == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("text, says", [
    ("env: [CartPole-v1\n", "is not valid YAML at line 2"),
    ("env: CartPole-v1\nppo: 5\n", "ppo: a section of fields"),
    (b"\xff\xfe\x00\x01env", "is not UTF-8 text"),
])
def test_bad_config_files_are_named(text, says, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", str(path)]) == 2
    assert says in capsys.readouterr().err


def test_train_rm_refuses_non_finite_and_negative_settings(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 4)
    for flags, says in ((["--margin", "nan"], "margin must be a finite number >= 0, got nan"),
                        (["--torch-threads", "-2"], "torch_threads must be an integer >= 0")):
        assert main(["train-rm", "--data", str(data), "--output-dir", str(tmp_path / "rm"), *flags]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "rm").exists()


def test_register_agent_checks_its_target_when_registered():
    from textrl.agents import register_agent

    with pytest.raises(ValueError, match=r"register_agent\('mine', 'nomod:X'\): module 'nomod' cannot be found"):
        register_agent("mine", "nomod:X")
    with pytest.raises(ValueError, match="expected 'module:Class'"):
        register_agent("mine", "no_colon")


def _raising_scorer(prompts, completions):
    return [1.0 / 0 for _ in completions]


def test_a_scorer_that_raises_is_named_with_where_and_on_what(tmp_path, capsys):
    from textrl.api import Trainer

    trainer = Trainer("textrl/tiny-char-gpt2", reward_funcs=_raising_scorer, train_dataset=["a b", "c d"], quiet=True,
                      args={"total_steps": 64, "num_envs": 4, "output_dir": str(tmp_path / "run"),
                            "env_kwargs": {"max_new_tokens": 4}})
    with pytest.raises(ValueError, match=r"scorer: _raising_scorer raised ZeroDivisionError: .*division by zero at .*"
                                         r"test_hardening.py:\d+, scoring \d+ completion"):
        trainer.train()


class _NarrowEnv:  # a custom text env whose constructor takes fewer arguments than textrl passes
    def __init__(self, num_envs, tokenizer):
        pass


def test_a_custom_env_that_cannot_take_the_run_arguments_says_what_it_must_accept(tmp_path, capsys):
    import gymnasium as gym

    gym.register("test_hardening/Narrow-v0", vector_entry_point=f"{__name__}:_NarrowEnv", kwargs={"model": "textrl/tiny-char-gpt2"})
    assert main(["train", "--env", "test_hardening/Narrow-v0", "--num-envs", "4", "--total-steps", "64",
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "could not be called with what a text run passes it (num_envs, tokenizer, device" in err
    assert "Give its __init__ a **kwargs" in err
