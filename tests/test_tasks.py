"""The built-in verifiable and multi-turn tasks, the verifiable-reward helpers, and `textrl eval`."""

import itertools
import json
import math
import os

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from test_multi_turn import chat_tokenizer
from textrl.envs.tasks.arithmetic import ArithmeticEnv, arithmetic_rows
from textrl.envs.tasks.calculator import CalculatorEnv, calculate, calculator_rows
from textrl.envs.tasks.guess_number import GuessNumberEnv, guess_number_rows
from textrl.envs.toy import CHAT_TEMPLATE, tiny_gpt2
from textrl.envs.verifiable import exact_match, extract_answer, lenient_match, pass_at_k, strict_match

import textrl  # noqa: F401  (registers the envs)
from textrl.cli import main
from textrl.lm.models import load_tokenizer


@pytest.mark.parametrize("text, strict, lenient", [
    ("3 + 4 = 7. Answer: 7", "7", "7"),
    ("The answer is 12.", "12", "12"),
    ("so 5 + 5 = 10", None, "10"),
    ("#### 1,234", "1234", "1234"),
    ("\\boxed{-3}", "-3", "-3"),
    ("Answer: 7.0 (I think 8)", "7", "8"),
    ("no numbers here", None, None),
])
def test_answer_extraction(text, strict, lenient):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "lenient") == lenient


def test_exact_match_and_reward_functions():
    completions = ["Answer: 7", "it is 7", "Answer: 8"]
    assert strict_match(completions, [7, 7, 7]) == [1.0, 0.0, 0.0]
    assert lenient_match(completions, answer=["7", 7, 7], prompts=None) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="3 completions but 2 answers"):
        exact_match(completions, [1, 2])
    with pytest.raises(ValueError, match="mode must be 'strict' or 'lenient'"):
        extract_answer("1", "fuzzy")


def test_pass_at_k_is_the_chance_that_one_of_k_draws_is_correct():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 0, 2), (4, 4, 1)]:
        draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_calculator_evaluates_arithmetic_only():
    assert calculate("2 + 3 * (4 - 1)") == 11
    assert calculate("12 x 3") == 36
    for bad in ("__import__('os').system('true')", "a + 1", "2 ** 1000", "1 / 0", "9" * 101):
        with pytest.raises(ValueError):
            calculate(bad)


def test_task_data_is_fixed_and_held_out_rows_are_disjoint():
    train, held = arithmetic_rows("train"), arithmetic_rows("eval")
    assert (len(train), len(held)) == (244, 80) and train == arithmetic_rows("train")
    pair = {r["prompt"].split("?")[0].split(".")[0] for r in held}
    assert not pair & {r["prompt"].split("?")[0].split(".")[0] for r in train}
    assert all(r["answer"] == sum(int(x) for x in r["prompt"].replace("?", " ").replace(".", " ").split()
                                  if x.isdigit()) for r in train)
    assert not {r["prompt"] for r in calculator_rows("train")} & {r["prompt"] for r in calculator_rows("eval")}
    assert {r["secret"] for r in guess_number_rows("train")} == set(range(1, 11))


class Scripted:
    """Steps an env by hand: each row writes the given turns' tokens, one per step, ending each with EOS (and
    waits while the env writes its reply)."""

    def __init__(self, env, turns):
        self.env, self.turns = env, turns

    def play(self):
        tok, env = self.env.tokenizer, self.env
        obs, info = env.reset(seed=0)
        queue = [[t for turn in turns for t in tok(turn, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
                 for turns in self.turns]
        infos = []
        while not env.done.all():
            replying = env.replying.tolist()  # the env is writing its reply there: the action is ignored
            tokens = torch.tensor([q.pop(0) if q and not r else tok.eos_token_id for q, r in zip(queue, replying, strict=True)])
            obs, reward, term, trunc, info = env.step(tokens)
            infos.append((reward, term, trunc, info))
        return obs, infos


@pytest.fixture(scope="module")
def smol_tokenizer():
    # the GPU check (benchmarks/gpu_check.sh) carries SmolLM2's tokenizer files without the GGUF package
    return load_tokenizer(os.environ.get("TEXTRL_TEST_SMOLLM2_TOKENIZER", "smollm2-135m-instruct"))


def test_calculator_appends_the_tool_result_and_pays_the_final_answer(smol_tokenizer):
    env = CalculatorEnv(2, smol_tokenizer, prompts=[{"prompt": "What is 12 * 3?", "answer": 36}])
    obs, steps = Scripted(env, [["<calc>12 * 3</calc>", "Answer: 36"], ["<calc>12 * y</calc>", "Answer: 35"]]).play()
    text = smol_tokenizer.decode(obs["input_ids"][0][obs["attention_mask"][0].bool()].tolist())
    assert "<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.count("<|im_end|>") == text.count("<|im_start|>")  # every turn closed once
    last = steps[-1][3]
    ends = [s[3] for s in steps if bool(s[3]["_score"].any())]
    scores = torch.stack([e["score"] for e in ends]).sum(0)
    assert scores.tolist() == [1.0, 0.0]
    calls = torch.stack([e["tool_calls"] for e in ends]).sum(0)
    errors = torch.stack([e["tool_errors"] for e in ends]).sum(0)
    assert calls.tolist() == [1.0, 1.0] and errors.tolist() == [0.0, 1.0] and last["_turns"].any()
    assert "<|im_start|>tool\nerror:" in smol_tokenizer.decode(obs["input_ids"][1].tolist())


def test_guess_number_says_higher_or_lower_and_pays_less_for_more_guesses(smol_tokenizer):
    env = GuessNumberEnv(1, smol_tokenizer, prompts=[{"prompt": "Guess", "secret": 6}])
    obs, steps = Scripted(env, [["I guess 3", "maybe", "8", "6"]]).play()
    text = smol_tokenizer.decode(obs["input_ids"][0].tolist())
    assert text.index("Higher.") < text.index("Reply with a number.") < text.index("Lower.")
    reward = sum(float(s[0][0]) for s in steps)
    assert math.isclose(reward, 1.0 - 0.25 * 3 - 0.1, abs_tol=1e-6) and bool(steps[-1][1][0])  # found at guess 4
    assert float(steps[-1][3]["turns"][0]) == 4 and float(steps[-1][3]["found"][0]) == 1


def test_arithmetic_reports_strict_and_lenient_separately(smol_tokenizer):
    env = ArithmeticEnv(3, smol_tokenizer, prompts=[{"prompt": "What is 3 + 4?", "answer": 7}])
    _, steps = Scripted(env, [["3 + 4 = 7"], ["Answer: 7"], ["Answer: 8"]]).play()
    ends = {k: sum(s[3][k] for s in steps) for k in ("correct", "strict_correct", "score")}  # 0 before the end
    assert ends["score"].tolist() == [1.0, 1.0, 0.0]  # the reward is the lenient match
    assert ends["correct"].tolist() == [1.0, 1.0, 0.0] and ends["strict_correct"].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("env_id", ["textrl/Arithmetic-v0", "textrl/Calculator-v0", "textrl/GuessNumber-v0"])
def test_tasks_are_registered_gymnasium_envs(env_id, smol_tokenizer):
    vec = gym.make_vec(env_id, num_envs=2, tokenizer=smol_tokenizer)
    assert vec.unwrapped.eval_prompts and vec.unwrapped.success is not None
    assert vec.unwrapped.stop_token_ids == (smol_tokenizer.eos_token_id,)
    env = gym.make(env_id, tokenizer=smol_tokenizer, max_new_tokens=40, max_turn_tokens=8)
    check_env(env.unwrapped, skip_render_check=True)


def _tiny_model_dir(tmp_path, extra: int = 0):
    """A tiny chat model saved as a folder; ``extra`` logits past the tokenizer's tokens (Qwen2 pads its
    vocabulary so: a random model samples them, which the env takes as actions that decode to nothing)."""
    folder = tmp_path / "tiny"
    tok = chat_tokenizer()
    tiny_gpt2(len(tok) + extra, n_positions=512).save_pretrained(folder)  # (the game's prompt is ~170 characters)
    tok.save_pretrained(folder)
    assert load_tokenizer(str(folder)).chat_template == CHAT_TEMPLATE
    return folder


def test_textrl_eval_writes_its_report_and_a_trained_run_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _tiny_model_dir(tmp_path, extra=16)  # (ids past the tokenizer's, sampled in eval and train alike)
    common = ["--env", "textrl/GuessNumber-v0", "--num-samples", "2", "--max-prompts", "3", "--device", "cpu"]
    assert main(["eval", *common, "--model", str(model), "--output-dir", "base"]) == 0
    report = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert report["prompts"] == 3 and set(report["pass_at_k"]) == {"1", "2"} and report["kl_to_base"] < 1e-4
    assert report["episode"]["turns"] >= 1 and len(report["per_prompt_success"]) == 3
    assert "mean turns" in (tmp_path / "base" / "samples.md").read_text()
    assert main(["train", "--env", "textrl/GuessNumber-v0", "--model", str(model), "--num-envs", "4",
                 "--total-steps", "480", "--device", "cpu", "--output-dir", "run", "--eval-generations", "1",
                 "--env-kwargs", '{"eval_prompts": [{"prompt": "go", "secret": 3}]}', "--lora-r", "0"]) == 0
    assert main(["eval", "--run", "run", "--num-samples", "1", "--max-prompts", "2"]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    # the trained policy moved: the base model's KL is 0 (above); this k1 estimate is signed, so |KL| > 0
    assert report["env"] == "textrl/GuessNumber-v0" and abs(report["kl_to_base"]) > 1e-3
    with pytest.raises(SystemExit):
        main(["eval", "--bogus"])
    assert main(["eval", "--run", "run", "--model", str(model)]) == 2  # one or the other
    assert main(["eval"]) == 2
    tiny_gpt2(34).save_pretrained(model)  # a context of 128 positions: the prompts do not fit, said before sampling
    assert main(["eval", *common, "--model", str(model)]) == 2
