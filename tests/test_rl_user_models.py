"""A user's model and chat data in the on-policy recipes, best-of-N, rejection sampling and eval:
dropout off (exact first ratio and KL on a GPT-2 with dropout 0.1), chat templates applied to
conversational prompts (exact token ids reaching the policy), the reward model reading the
conversation with its own template."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rlhfkit.rollout as rollout
from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.train.runs import read_metrics

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATIONS = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": f"the cat sat {i}"}]
                 for i in range(4)]


def has_a(prompts, completions, **kw):
    return [float("a" in (c if isinstance(c, str) else c[0]["content"])) for c in completions]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    path = save_tiny(root / "gpt2", GPT2LMHeadModel(cfg), tok)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat sat {i}"}) + "\n" for i in range(8)))
    return {"model": path, "prompts": str(prompts)}


def _run(recipe, assets, out, **kw):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    extra = dict(num_generations=2) if recipe != "ppo" else {}
    cfg = mod.Config(model=assets["model"], prompts=assets["prompts"], output_dir=str(out), max_steps=1,
                     prompts_per_step=4, max_completion_length=5, per_device_train_batch_size=8, num_ppo_epochs=2,
                     report_to="jsonl", learning_rate=1e-3, **extra, **kw)
    mod.main(cfg, reward_funcs=has_a)
    return read_metrics(out)[0]


@pytest.mark.parametrize("recipe", ["ppo", "grpo", "rloo"])
def test_dropout_off_gives_ratio_one_and_zero_kl_on_gpt2(gpt2, tmp_path, recipe):
    row = _run(recipe, gpt2, tmp_path / "off")
    assert row["first_ratio_mean"] == 1.0 and row["first_ratio_min"] == 1.0 and row["first_ratio_max"] == 1.0
    assert row["kl"] == 0.0
    # the check can fail: with dropout kept, rollout and training forwards draw different masks
    kept = _run(recipe, gpt2, tmp_path / "on", disable_dropout=False)
    assert kept["first_ratio_min"] != 1.0 or kept["first_ratio_max"] != 1.0


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    path = save_tiny(root / "policy", tiny_policy(tok), tok)
    prompts = root / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c, "answer": str(i)}) + "\n" for i, c in enumerate(CONVERSATIONS))
                       + "".join(json.dumps({"messages": c, "answer": "x"}) + "\n" for c in CONVERSATIONS))
    expected = {}
    for c in CONVERSATIONS:
        ids = tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        expected[c[-1]["content"]] = [tok.bos_token_id] + list(ids)  # rlhfkit puts BOS first, as SFT does
    return {"model": path, "prompts": str(prompts), "tok": tok, "expected": expected, "root": root}


class Spy:
    """Wraps the generation engine; records the prompt token ids of every row it is given."""

    def __init__(self, real):
        self.real, self.ids = real, []

    def __call__(self, *args, **kwargs):
        roll = self.real(*args, **kwargs)
        self.ids += [q[m.bool()].tolist() for q, m in zip(roll.query_ids, roll.query_mask)]
        return roll


def _check_ids(spy, chat):
    assert spy.ids
    wanted = list(chat["expected"].values())
    for ids in spy.ids:
        assert ids in wanted, chat["tok"].decode(ids)
    assert any(chat["tok"].decode(ids).count("<|user|>") == 1 for ids in spy.ids)


@pytest.mark.parametrize("recipe", ["ppo", "grpo", "rloo"])
def test_on_policy_recipes_apply_the_chat_template(chat, tmp_path, monkeypatch, recipe):
    import importlib

    spy = Spy(rollout.ENGINES["hf"])
    monkeypatch.setitem(rollout.ENGINES, "hf", spy)
    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    seen = []

    def conv_reward(prompts, completions, answer, **kw):
        # TRL's layout: conversational prompts stay message lists, completions are assistant turns
        assert all(isinstance(p, list) and c[0]["role"] == "assistant" for p, c in zip(prompts, completions))
        seen.append(answer)
        return [0.0] * len(completions)

    extra = dict(num_generations=2) if recipe != "ppo" else {}
    mod.main(mod.Config(model=chat["model"], prompts=chat["prompts"], output_dir=str(tmp_path), max_steps=1,
                        prompts_per_step=4, max_completion_length=3, per_device_train_batch_size=8, report_to="jsonl",
                        **extra), reward_funcs=conv_reward)
    _check_ids(spy, chat)
    assert seen


def test_best_of_n_rejection_sampling_and_eval_apply_the_chat_template(chat, tmp_path, monkeypatch):
    from rlhfkit.eval import run_eval
    from rlhfkit.recipes import best_of_n, rejection_sampling

    spy = Spy(rollout.generate)
    for module in (rollout, best_of_n, rejection_sampling, run_eval):  # each calls the name it imported
        if hasattr(module, "generate"):
            monkeypatch.setattr(module, "generate", spy)
    rw = chat["root"] / "rw.py"
    rw.write_text("def n(prompts, completions, answer, **kw):\n    return [float(len(a)) for a in answer]\n")
    best_of_n.main(best_of_n.Config(model=chat["model"], prompts=chat["prompts"], reward=[f"py:{rw}:n"], n=2,
                                    kl_pool=2, max_new_tokens=3, output_dir=str(tmp_path / "bon")))
    _check_ids(spy, chat)
    spy.ids.clear()
    rejection_sampling.main(rejection_sampling.Config(
        model=chat["model"], prompts=chat["prompts"], reward=[f"py:{rw}:n"], rounds=1, k=2, prompts_per_round=4,
        max_new_tokens=3, per_device_train_batch_size=4, output_dir=str(tmp_path / "rs"), report_to="jsonl",
        progress=False))
    _check_ids(spy, chat)
    spy.ids.clear()
    run_eval.main(run_eval.Config(model=chat["model"], reference=chat["model"], prompts=chat["prompts"],
                                  judge=[f"py:{rw}:n"], max_new_tokens=3, n_boot=5, output_dir=str(tmp_path / "ev")))
    _check_ids(spy, chat)


def test_reward_model_reads_the_conversation_with_its_own_template(chat, tmp_path):
    from rl_helpers import tiny_rm
    from rlhfkit.judges.specs import RewardModelReward

    rm_tok = tiny_tokenizer()
    rm_tok.chat_template = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}"
                            "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    rm = RewardModelReward(save_tiny(tmp_path / "rm", tiny_rm(rm_tok), rm_tok))
    conv = CONVERSATIONS[0]
    reply = [{"role": "assistant", "content": "a kind word"}]
    (p_text,), (r_text,) = rm.texts([conv], [reply])
    assert p_text == rm_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert p_text + r_text == rm_tok.apply_chat_template(conv + reply, tokenize=False)
    assert p_text.startswith("[SYSTEM] be kind</s>") and r_text.startswith("a kind word")
    # plain-text prompts are scored as before
    assert rm.texts(["the cat"], [" sat"]) == (["the cat"], [" sat"])
