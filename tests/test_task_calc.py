"""The bundled agentic task 'calc' (rlhfkit.tasks.calc)."""

from __future__ import annotations

import pytest

from rlhfkit.data.turns import encode_conversation
from rlhfkit.envs import ToolBox, ToolCall, detect_format
from rlhfkit.tasks import calc


def test_calculator_reads_and_writes_the_task_notation():
    assert calc.calculator("57+86+21") == "551"  # 75 + 68 + 12 = 155
    assert calc.calculator("00+00+10") == "100"
    msgs, stats = ToolBox(calc.tools).run([ToolCall("calculator", {"expression": "57+86"})])
    assert msgs[0]["content"].startswith("error: ValueError: cannot read '57+86'") and stats.errors == 1


def test_splits_are_disjoint_and_fixed():
    train, held = calc.prompt_records("train"), calc.prompt_records("eval")
    assert len(train) == calc.NUM_TRAIN_PROMPTS and len(held) == calc.NUM_EVAL
    key = lambda p: tuple(sorted(int(x[::-1]) for x in p["prompt"][3:11].split("+")))  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    sft = {tuple(sorted(int(x[::-1]) for x in r["messages"][0]["content"][3:11].split("+")))
           for r in calc.sft_records("train")}
    assert not sft & {key(p) for p in held}
    assert calc.prompt_records("eval") == held
    assert all(str(sum(key(p))) == p["answer"] for p in held[:50])


def test_verifier():
    p = ["Q: 57+86+21= A:"] * 5
    episodes = [[{"role": "assistant", "content": "", "tool_calls": []}, {"role": "tool", "content": "551"},
                 {"role": "assistant", "content": " 551"}], " 551", "551 ", " 55", " 5511"]
    assert calc.reward_fn(p, episodes) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert calc.reward_fn(p[:1], [" 551"], answer=["155"]) == [1.0]
    assert calc.reward_fn(["hello"], [" 551"]) == [None]


def test_sft_traces_are_noisy_and_encode_with_whole_template_tokens():
    rows = calc.sft_records("train")
    right = [calc.reward_fn([r["messages"][0]["content"]], [r["messages"]])[0] for r in rows]
    assert 0.65 < sum(right) / len(rows) < 0.85  # a careless annotator (SFT_NOISE of the traces slip)
    assert all(calc.reward_fn([r["messages"][0]["content"]], [r["messages"]])[0] for r in calc.sft_records("eval"))
    tok = calc.build_tokenizer()
    assert detect_format(tok) == "hermes"
    enc = encode_conversation(tok, rows[0]["messages"], rows[0]["tools"])
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert calc.CALL_HEAD in tokens and calc.CALL_TAIL in tokens and "<tool_call>" in tokens
    assert len(enc["input_ids"]) < 80
    supervised = tok.decode([t for t in enc["labels"] if t != -100])
    expr = rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]["expression"]
    assert supervised == f'<tool_call>\n{calc.CALL_HEAD}{expr}{calc.CALL_TAIL}\n</tool_call><eos>{rows[0]["messages"][3]["content"]}<eos>'


def test_bundled_base_and_tokenizer_agree():
    from rlhfkit.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(calc.base_model_path()))
    model = load_policy(str(calc.base_model_path()))
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(calc.build_tokenizer())
    assert tok.chat_template == calc.CHAT_TEMPLATE
    assert load_tokenizer(str(calc.tokenizer_path())).get_vocab() == tok.get_vocab()


def test_environment_name_loads_the_tools():
    from rlhfkit.recipes import grpo
    from rlhfkit.recipes.agentic import load_factory

    env = load_factory(grpo.Config(model="x", environment="calc"))()
    assert [s["function"]["name"] for s in env.toolbox.schemas] == ["calculator"]
    with pytest.raises(Exception, match="no bundled task"):
        load_factory(grpo.Config(model="x", environment="nosuchtask"))
