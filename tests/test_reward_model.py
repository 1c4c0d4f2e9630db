"""Reward models trained from preference pairs (Bradley–Terry) on the offline MiniLM encoder, their
normalisation, bad-data reporting, and their use as a text env's scorer."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from textrl.reward_model import (
    NORMALISATION_FILE,
    RewardModelConfig,
    TrainedRewardScorer,
    bradley_terry_loss,
    load_preferences,
    train_reward_model,
)

SUBJECTS = ["the weekend", "my new job", "the trip to the coast", "our garden", "the concert", "the first snow",
            "the school play", "my birthday", "the morning walk", "the new bakery", "the football match",
            "the family dinner", "the library visit", "the museum", "the road trip", "the picnic", "the wedding",
            "the train ride", "the science fair", "the swimming lesson", "the bike repair", "the camping night",
            "the harvest festival", "the art class", "the neighbour's party", "the boat tour", "the lunch break",
            "the board game night", "the kitchen renovation", "the piano recital"]
GOOD = ["was wonderful and made me smile all day", "filled me with joy and gratitude",
        "was a delight, I loved every minute", "was bright, cheerful and full of laughter",
        "left everyone happy and excited", "was pure fun and warmth"]
BAD = ["was awful and made me miserable all day", "filled me with dread and regret",
       "was a disaster, I hated every minute", "was grey, bleak and full of complaints",
       "left everyone upset and exhausted", "was dull, cold and depressing"]


def preference_rows(subjects, seed=0):
    rng = random.Random(seed)
    rows = []
    for s in subjects:
        for _ in range(4):
            rows.append({"prompt": f"Tell me about {s}.", "chosen": f"{s.capitalize()} {rng.choice(GOOD)}.",
                         "rejected": f"{s.capitalize()} {rng.choice(BAD)}."})
    return rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_bradley_terry_loss_closed_form_and_gradient():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 1.0])
    loss = bradley_terry_loss(rc, rr)
    expected = (-torch.log(torch.sigmoid(torch.tensor(2.0))) - torch.log(torch.sigmoid(torch.tensor(-1.0)))) / 2
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()  # d/d rc = −σ(−(rc − rr)) / n: pushes the chosen score up
    torch.testing.assert_close(rc.grad, -torch.sigmoid(-(rc.detach() - rr)) / 2)
    # a margin shifts the target difference; large differences stay finite (softplus form)
    assert float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), 1.0)) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0])))


def test_minilm_reward_model_learns_a_preference_and_plugs_into_the_env(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(SUBJECTS[:24]))
    held_out = write_jsonl(tmp_path / "eval.jsonl", preference_rows(SUBJECTS[24:], seed=1))  # unseen subjects
    cfg = RewardModelConfig(data=str(train), eval_data=str(held_out), output_dir=str(tmp_path / "rm"),
                            num_epochs=2, batch_size=16, learning_rate=1e-4, seed=1)
    summary = train_reward_model(cfg, quiet=True)
    assert summary["eval_accuracy"] >= 0.9, summary
    m = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert "train/loss" in m[0] and m[-1]["eval/pairwise_accuracy"] == summary["eval_accuracy"]
    assert m[-1]["train/loss"] < m[0]["train/loss"]
    assert (tmp_path / "rm" / "model.safetensors").is_file() and list((tmp_path / "rm" / "tb").iterdir())

    # normalisation: the training completions score mean 0, std 1 through the saved scorer
    scorer = TrainedRewardScorer(tmp_path / "rm")
    rows, _ = load_preferences(train)
    s = scorer([r.prompt for r in rows] * 2, [r.chosen for r in rows] + [r.rejected for r in rows])
    assert abs(float(s.mean())) < 1e-3 and float(s.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert json.loads((tmp_path / "rm" / NORMALISATION_FILE).read_text())["gain"] == pytest.approx(summary["gain"])
    assert not any(p.requires_grad for p in scorer.model.parameters()) and not scorer.model.training

    # plain transformers reads it; and a text env scores with it (reward_model: PATH in a run config)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    from textrl.cli import resolve_train_config
    from textrl.train import make_run

    run, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--reward-model", str(tmp_path / "rm"),
                                   "--num-envs", "4", "--num-minibatches", "1", "--output-dir", str(tmp_path / "run")])
    env = make_run(run, quiet=True).envs
    assert env.unwrapped.scorer is not None and isinstance(env.unwrapped.scorer, TrainedRewardScorer)
    happy, sad = scorer(["Tell me about the zoo."] * 2, ["The zoo was wonderful and made me smile all day.",
                                                          "The zoo was awful and made me miserable all day."])
    assert happy > sad


@pytest.mark.parametrize("line, problem", [
    (b'{"prompt": "p", "chosen": "a"}', "missing key(s) ['rejected']"),
    (b'{"prompt": "p", "chosen": "", "rejected": "b"}', "'chosen' is empty"),
    (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen == rejected"),
    (b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}', "not UTF-8"),
    (b'{"prompt": "p", "chosen": "a", "rejected": 3}', "'rejected' must be a string"),
    (b'not json', "invalid JSON"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}', "'margin' must be a finite number"),
])
def test_bad_rows_are_reported_with_their_line_number(tmp_path, line, problem):
    good = json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}).encode()
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join([good, good, line, good]) + b"\n")
    with pytest.raises(ValueError, match="line 3: " + problem.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_preferences(path)
    rows, problems = load_preferences(path, skip_bad_rows=True)  # skipped, but counted and listed
    assert len(rows) == 3 and len(problems) == 1 and problems[0].startswith("line 3: ")


def test_train_rm_cli_says_how_many_rows_it_skipped(tmp_path):
    rows = preference_rows(SUBJECTS[:6])
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + ['{"prompt": "x", "chosen": "y", "rejected": "y"}']) + "\n")
    cmd = [sys.executable, "-m", "textrl", "train-rm", "--data", str(path), "--output-dir", str(tmp_path / "rm"),
           "--num-epochs", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and f"line {len(rows) + 1}: chosen == rejected" in proc.stderr  # stops by default
    proc = subprocess.run(cmd + ["--skip-bad-rows", "true"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 bad row(s)" in proc.stderr and "held-out pairwise accuracy" in proc.stderr
    assert json.loads((tmp_path / "rm" / "summary.json").read_text())["skipped_rows"] == 1


def test_lora_reward_model_is_merged_into_a_plain_checkpoint(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(SUBJECTS[:8]))
    summary = train_reward_model(RewardModelConfig(data=str(train), output_dir=str(tmp_path / "rm"), num_epochs=1,
                                                   lora_r=4, lora_targets=("query", "value"), learning_rate=1e-3),
                                 quiet=True)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "rm" / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys) and any("classifier" in k for k in keys)
    scorer = TrainedRewardScorer(tmp_path / "rm")  # plain transformers loads the merged model
    assert scorer(["Tell me about the zoo."], ["The zoo was lovely."]).shape == (1,)
    assert summary["train_pairs"] + summary["eval_pairs"] == 32


def test_decoder_backbone_trains_and_scores(tmp_path):
    """Any Hugging Face causal LM works as a backbone (last-token scalar head); here the tiny local GPT-2."""
    from textrl.envs.toy import char_tokenizer, tiny_gpt2

    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(SUBJECTS[:24]))
    summary = train_reward_model(RewardModelConfig(data=str(train), model=str(tmp_path / "base"), num_epochs=3,
                                                   output_dir=str(tmp_path / "rm"), learning_rate=1e-3), quiet=True)
    m = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["train/loss"] < m[0]["train/loss"]
    assert summary["eval_accuracy"] > summary["eval_accuracy_before"]
    scores = TrainedRewardScorer(tmp_path / "rm")(["Tell me about x."] * 2, ["X was wonderful.", "X was awful."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
