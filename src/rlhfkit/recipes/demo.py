"""`rlhfkit demo`: the whole RLHF loop on the bundled "say it kindly" task, then a report.

    base (shipped, or pretrained here) -> SFT -> simulated human comparisons -> reward model
    -> PPO, DPO and best-of-N -> evaluation against the SFT policy -> report.html

It ends by printing the win-rate table (gold panel vs the SFT reference) and the report's
path. `--quick` runs a seconds-long miniature of every stage (for smoke tests).

    rlhfkit demo                       # about 10 minutes on 2 CPU cores
    rlhfkit demo --quick --output_dir /tmp/demo
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from rlhfkit.config import from_dict, require
from rlhfkit.eval.metrics import win_rate
from rlhfkit.eval.overopt import (
    bon_kl,
    bon_sweep,
    collapse_events,
    describe,
    replay_alarm,
    rl_sweep_from_metrics,
)
from rlhfkit.eval.report import write_report
from rlhfkit.eval.run_eval import evaluate, rm_accuracy, text_metrics, write_results
from rlhfkit.judges.panel import GoldPanel
from rlhfkit.judges.sources import SimulatedSource, to_preference_records
from rlhfkit.losses.reward import preference_verdicts
from rlhfkit.models import load_policy, load_tokenizer, save_model, tiny_llama
from rlhfkit.models.reward import RewardScorer
from rlhfkit.recipes import dpo, ppo, pretrain, reward, sft
from rlhfkit.rollout import generate
from rlhfkit.tasks import kindly
from rlhfkit.train.runs import (
    atomic_write_json,
    atomic_write_text,
    one_run_per_folder,
    prepare_run_dir,
    read_metrics,
    seed_everything,
)

QUICK = dict(sft_steps=3, comparison_prompts=24, reward_steps=3, ppo_steps=2, dpo_steps=2, bon_n=4, eval_prompts=8, eval_samples=1,
             max_new_tokens=8, perplexity_lines=20, n_boot=20, batch_size=4, pretrain_steps=3)


@dataclasses.dataclass
class Config:
    output_dir: str = "runs/demo"
    """Folder for every stage's run, the evaluations, summary.json and report.html."""
    quick: bool = False
    """A seconds-long miniature of every stage (smoke test; the numbers mean nothing)."""
    base: str = "kindly"
    """Base model: 'kindly' (the shipped checkpoint; pretrained here if it is missing) or a folder."""
    pretrain_steps: int = 300
    """Pretraining steps when the shipped base checkpoint is missing."""
    sft_steps: int = 150
    """SFT optimiser steps."""
    comparison_prompts: int = 3072
    """Training prompts; two SFT samples of each are compared by the simulated annotators."""
    annotator_beta: float = 10.0
    """Simulated annotators' Bradley-Terry inverse temperature."""
    reward_steps: int = 120
    """Reward-model optimiser steps."""
    ppo_steps: int = 60
    """PPO updates."""
    ppo_kl_coef: float = 0.1
    """PPO KL coefficient beta."""
    ppo_entropy_coef: float = 0.1
    """PPO entropy bonus: keeps the policy's diversity (without it the demo's PPO lost a quarter of its distinct-1)."""
    ppo_learning_rate: float = 1e-4
    """PPO learning rate."""
    dpo_steps: int = 120
    """DPO optimiser steps."""
    dpo_beta: float = 0.1
    """DPO beta."""
    dpo_learning_rate: float = 5e-4
    """DPO learning rate."""
    bon_n: int = 16
    """Samples per prompt for best-of-N (and its over-optimisation sweep n = 1, 2, 4, ..., N)."""
    eval_prompts: int = 0
    """Held-out prompts in the evaluation (0: all 554 of the task's eval prompts)."""
    eval_samples: int = 2
    """Samples per held-out prompt and policy; win-rate intervals resample whole prompts."""
    max_new_tokens: int = 20
    """Response length."""
    perplexity_lines: int = 500
    """Held-out corpus lines for the perplexity (alignment tax)."""
    n_boot: int = 1000
    """Bootstrap resamples of the intervals."""
    batch_size: int = 16
    """Training micro-batch size."""
    methods: str = "ppo,dpo,bon"
    """Which of ppo, dpo, bon to run (comma separated)."""
    seed: int = 0
    """Seed of every stage."""

    def __post_init__(self) -> None:
        if self.quick:
            for k, v in QUICK.items():
                if getattr(self, k) == Config.__dataclass_fields__[k].default:
                    setattr(self, k, v)
        unknown = set(self.method_list) - {"ppo", "dpo", "bon"}
        require(not unknown, "methods", f"unknown method(s) {sorted(unknown)}; choose from ppo, dpo, bon")
        require(self.bon_n >= 2, "bon_n", "must be >= 2")
        require(min(self.sft_steps, self.reward_steps, self.comparison_prompts) >= 1, "sft_steps",
                "step and prompt counts must be >= 1")
        require(self.eval_prompts >= 0, "eval_prompts", "must be >= 0 (0: all eval prompts)")
        require(self.eval_samples >= 1, "eval_samples", "must be >= 1")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


# ---------------------------------------------------------------------------------------------
# progress display


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: unlike wall time it
    hardly changes when other jobs compete for the cores."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Stages:
    """A rich status line per stage, and a tick with the elapsed wall and CPU time when it ends."""

    def __init__(self, total: int):
        self.console, self.total, self.i, self.times, self.cpu = Console(), total, 0, {}, {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.i += 1
        t0, c0 = time.perf_counter(), cpu_seconds()
        label = f"[{self.i}/{self.total}] {name}"
        with self.console.status(f"[bold cyan]{label}[/] ..."):
            yield
        self.times[name] = round(time.perf_counter() - t0, 1)
        self.cpu[name] = round(cpu_seconds() - c0, 1)
        self.console.print(f"[green]done[/] {label} [dim]({self.times[name]:.1f} s, {self.cpu[name]:.1f} CPU s)[/]")

    def skip(self, name: str, why: str) -> None:
        self.i += 1
        self.console.print(f"[yellow]skipped[/] [{self.i}/{self.total}] {name}: {why}")


def _quiet(**kw: Any) -> dict:
    return dict(progress=False, report_to="jsonl", **kw)


# ---------------------------------------------------------------------------------------------
# stages


def base_model(cfg: Config, out: Path) -> str:
    if cfg.base != "kindly":
        return cfg.base
    try:
        return str(kindly.base_model_path())
    except FileNotFoundError:
        if cfg.quick:  # a smoke test needs a model, not a good one
            tok = load_tokenizer("kindly:tokenizer")
            save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  tokenizer=tok, seed=cfg.seed), tok, out / "base")
            return str(out / "base")
        pcfg = from_dict(pretrain.Config, _quiet(output_dir=str(out / "pretrain"), max_steps=cfg.pretrain_steps, seed=cfg.seed))
        pretrain.main(pcfg)
        return str(out / "pretrain" / "final")


def run_sft(cfg: Config, base: str, out: Path) -> str:
    scfg = from_dict(sft.Config, _quiet(model=base, dataset="kindly", output_dir=str(out / "sft"), max_steps=cfg.sft_steps,
                                        per_device_train_batch_size=max(cfg.batch_size, 4) * 2, learning_rate=5e-4,
                                        lr_scheduler_type="cosine", warmup_steps=min(20, cfg.sft_steps // 5), logging_steps=10,
                                        max_length=64, max_eval_examples=128, seed=cfg.seed))
    sft.main(scfg)
    return str(out / "sft" / "final")


def collect_comparisons(cfg: Config, sft_path: str, out: Path, split: str = "train",
                        n_prompts: int | None = None) -> tuple[Path, dict]:
    """Two samples per prompt from the SFT policy, labelled by simulated annotators."""
    tok = load_tokenizer(sft_path)
    policy = load_policy(sft_path, trainable=False).eval()
    prompts = kindly.prompts(split)
    order = np.random.default_rng(cfg.seed).permutation(len(prompts))[: n_prompts or cfg.comparison_prompts]
    prompts = [prompts[i] for i in order]
    seed = cfg.seed + (0 if split == "train" else 101)
    roll = generate(policy, tok, prompts, cfg.max_new_tokens, num_samples=2, seed=seed)
    a, b = roll.responses[0::2], roll.responses[1::2]
    labels = SimulatedSource(beta=cfg.annotator_beta, seed=seed).compare(prompts, a, b)
    records, counts = to_preference_records(prompts, a, b, labels)
    path = out / "comparisons" / f"preferences_{split}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(out / "comparisons" / f"counts_{split}.json", counts)
    return path, counts


def run_reward(cfg: Config, sft_path: str, prefs: Path, out: Path) -> str:
    rcfg = from_dict(reward.Config, _quiet(model=sft_path, dataset=str(prefs), output_dir=str(out / "reward"),
                                           max_steps=cfg.reward_steps, per_device_train_batch_size=cfg.batch_size,
                                           learning_rate=3e-4, logging_steps=10, eval_fraction=0.1, seed=cfg.seed))
    return reward.main(rcfg, printer=lambda *a, **k: None).get("model_path", str(out / "reward" / "final"))


def run_ppo(cfg: Config, sft_path: str, rm_path: str, out: Path) -> str:
    pcfg = from_dict(ppo.Config, _quiet(model=sft_path, reward_model=rm_path, output_dir=str(out / "ppo"),
                                        max_steps=cfg.ppo_steps, kl_coef=cfg.ppo_kl_coef, learning_rate=cfg.ppo_learning_rate,
                                        entropy_coef=cfg.ppo_entropy_coef,
                                        max_completion_length=cfg.max_new_tokens, prompts_per_step=max(cfg.batch_size, 4) * 2,
                                        per_device_train_batch_size=cfg.batch_size, logging_steps=1, num_eval_prompts=0,
                                        eval_prompts="", seed=cfg.seed))
    ppo.main(pcfg)
    return str(out / "ppo" / "final")


def run_dpo(cfg: Config, sft_path: str, prefs: Path, out: Path) -> str:
    dcfg = from_dict(dpo.Config, _quiet(model=sft_path, dataset=str(prefs), output_dir=str(out / "dpo"),
                                        max_steps=cfg.dpo_steps, beta=cfg.dpo_beta, learning_rate=cfg.dpo_learning_rate,
                                        per_device_train_batch_size=cfg.batch_size, logging_steps=5, max_length=96,
                                        seed=cfg.seed))
    dpo.main(dcfg)
    return str(out / "dpo" / "final")


def best_of_n(cfg: Config, sft_path: str, scorer, judge, prompts: list[str]) -> tuple[list[str], list[dict]]:
    """N SFT samples per prompt; the RM's favourite is the answer. Also the over-optimisation sweep."""
    tok = load_tokenizer(sft_path)
    policy = load_policy(sft_path, trainable=False).eval()
    roll = generate(policy, tok, prompts, cfg.max_new_tokens, num_samples=cfg.bon_n, seed=cfg.seed + 7)
    proxy = np.asarray(scorer.score(roll.prompts, roll.responses)).reshape(len(prompts), cfg.bon_n)
    gold = np.asarray(judge.score(roll.prompts, roll.responses)).reshape(len(prompts), cfg.bon_n)
    best = proxy.argmax(axis=1)
    responses = [roll.responses[i * cfg.bon_n + j] for i, j in enumerate(best)]
    return responses, bon_sweep(proxy, gold)


# ---------------------------------------------------------------------------------------------
# evaluation and the summary


def reward_model_accuracy(cfg: Config, sft_path: str, rm_path: str, out: Path) -> dict:
    """RM accuracy on comparisons of held-out prompts: against the annotators' labels and
    against the noise-free panel order (what the RM should have learned)."""
    path, _ = collect_comparisons(cfg, sft_path, out, split="eval", n_prompts=cfg.eval_prompts)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    scorer, panel = RewardScorer(rm_path), GoldPanel()
    prompts = [r["prompt"] for r in records]
    chosen, rejected = [r["chosen"] for r in records], [r["rejected"] for r in records]
    gold_gap = np.asarray(panel.score(prompts, chosen), np.float64) - np.asarray(panel.score(prompts, rejected), np.float64)
    rm_gap = np.asarray(scorer.score(prompts, chosen), np.float64) - np.asarray(scorer.score(prompts, rejected), np.float64)
    decided = gold_gap != 0  # the panel has no order on exact gold ties
    # preference_accuracy's rule against the panel's order: equal rewards count wrong
    correct, _ = preference_verdicts(torch.from_numpy(rm_gap[decided]), torch.from_numpy((gold_gap[decided] > 0) * 1.0))
    agree = correct.double().numpy()
    result = {"name": "reward model (held-out comparisons)", "rm_accuracy": rm_accuracy(scorer, records, str(path), cfg.n_boot),
              "gold_accuracy": win_rate(agree, n_boot=cfg.n_boot) if agree.size else {"mean": float("nan"), "n": 0}}
    atomic_write_json(out / "eval" / "reward_model" / "eval.json", result)
    return result


def evaluate_all(cfg: Config, sft_path: str, rm_path: str, policies: dict[str, str], out: Path,
                 stages: Stages) -> tuple[dict[str, dict], list[dict]]:
    """Every policy and best-of-N against the SFT policy; returns the metrics and the alarms
    (reward hacking replayed over PPO's training metrics; diversity collapse and perplexity
    blow-up of each policy against the SFT policy), also written to alarms.jsonl."""
    judge, scorer = GoldPanel(), RewardScorer(rm_path)
    tok = load_tokenizer(sft_path)
    reference = load_policy(sft_path, trainable=False).eval()
    held_out = kindly.prompts("eval")[: cfg.eval_prompts or None]
    # every prompt eval_samples times: intervals tight enough to read (half-width about 0.03 at
    # 554 prompts x 2), resampling whole prompts since a prompt's samples are not independent
    prompts = [p for p in held_out for _ in range(cfg.eval_samples)]
    clusters = [i for i in range(len(held_out)) for _ in range(cfg.eval_samples)]
    corpus = kindly.corpus_lines("eval")[: cfg.perplexity_lines]
    results, ref = {}, {}
    kw = dict(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, n_boot=cfg.n_boot, clusters=clusters)
    with torch.no_grad():
        for name, path in {"sft": sft_path, **policies}.items():
            with stages.stage(f"evaluate {name}"):
                policy = reference if name == "sft" else load_policy(path, trainable=False).eval()
                m, rows = evaluate(policy, reference, tok, prompts, judge, scorer, corpus, reference_rollout=ref.get("rollout"),
                                   reference_perplexity=ref.get("perplexity"), **kw)
                ref = m["_reference"]
                m.update(name=name, model=path, reference=sft_path)
                write_results(out / "eval" / name, m, rows)
                results[name] = m
        overopt: dict[str, list] = {}
        if "bon" in cfg.method_list:
            with stages.stage(f"best-of-{cfg.bon_n} and its sweep"):
                responses, sweep = best_of_n(cfg, sft_path, scorer, judge, prompts)
                m, rows = text_metrics(prompts, responses, ref["rollout"].responses, judge, scorer, tok,
                                       n_boot=cfg.n_boot, seed=cfg.seed, clusters=clusters)
                kl = float(bon_kl(cfg.bon_n))  # analytic (an upper bound on the true KL; Beirami et al. 2024)
                m.update(kl={"mean": kl, "lo": kl, "hi": kl, "n": len(prompts)}, name=f"best-of-{cfg.bon_n}",
                         model=sft_path, reference=sft_path, perplexity=results["sft"].get("perplexity"))
                write_results(out / "eval" / "bon", m, rows)
                results["bon"] = m
                overopt["bon"] = sweep
    alarms: list[dict] = []
    ppo_metrics = out / "ppo" / "metrics.jsonl"
    if ppo_metrics.is_file():
        rows = read_metrics(ppo_metrics)
        overopt["rl"] = rl_sweep_from_metrics(rows)
        # the hacking alarm as a training loop would have run it, replayed over PPO's logged gold and proxy
        alarms += [{"policy": "ppo", **e} for e in replay_alarm(rows)]
    for name, m in results.items():  # mode collapse and capability loss against the SFT policy
        if name != "sft":
            alarms += [{"policy": name, **e} for e in collapse_events(m, results["sft"])]
    atomic_write_text(out / "alarms.jsonl", "".join(json.dumps(e) + "\n" for e in alarms))
    if overopt:
        atomic_write_json(out / "overopt.json", overopt)
    return results, alarms


def win_rate_table(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name, m in results.items():
        wr, lc = m["win_rate"], m["lc_win_rate"]
        row = {"method": m.get("name", name), "win_rate": round(wr["mean"], 3),
               "win_rate_95ci": f"[{wr['lo']:.3f}, {wr['hi']:.3f}]", "lc_win_rate": round(lc["mean"], 3),
               "gold": round(m["gold"]["mean"], 4), "kl": round(m["kl"]["mean"], 3),
               "win_rate_half_width": round((wr["hi"] - wr["lo"]) / 2, 4), "comparisons": wr["n"]}
        if "gold_difference" in m:  # paired: policy minus SFT on the same prompts
            gd = m["gold_difference"]
            row["gold_difference"] = round(gd["mean"], 4)
            row["gold_difference_95ci"] = f"[{gd['lo']:.4f}, {gd['hi']:.4f}]"
        if "proxy" in m:
            row["proxy"] = round(m["proxy"]["mean"], 4)
        for key in ("distinct_1", "distinct_2"):  # diversity: the collapse alarm's first signal
            if key in m:
                row[key] = round(m[key], 3)
        if m.get("perplexity") is not None:
            row["perplexity"] = round(m["perplexity"], 2)
        rows.append(row)
    return rows


def print_table(rows: list[dict], report: Path, seconds: float, alarms: list[dict] = ()) -> None:
    table = Table(title="Win rate against the SFT policy (gold panel, ties half)")
    headers = {"method": "method", "win_rate": "win rate", "win_rate_95ci": "95% CI", "lc_win_rate": "LC win",
               "gold_difference": "gold vs SFT", "gold_difference_95ci": "95% CI", "proxy": "proxy", "kl": "KL",
               "distinct_1": "dist-1", "distinct_2": "dist-2", "perplexity": "ppl"}
    cols = [c for c in headers if any(c in r for r in rows)]
    for c in cols:
        table.add_column(headers[c], justify="left" if c == "method" else "right")
    for r in rows:
        table.add_row(*[str(r.get(c, "-")) for c in cols])
    console = Console()
    if not console.is_terminal:  # a file or a pipe has no width: print the table whole, never clipped
        console = Console(width=Console(width=10_000).measure(table).maximum)
    console.print(table)
    for event in alarms:
        console.print(f"[bold red]alarm[/] {event['policy']}: {describe(event)}")
    console.print(f"report: [bold]{report}[/]  ({seconds:.0f} s in all)")


@one_run_per_folder
def main(cfg: Config) -> dict:
    """Run every stage; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    hf_logging.disable_progress_bar()  # the stage display is the progress report
    t0, c_start = time.perf_counter(), cpu_seconds()
    out = prepare_run_dir(cfg.output_dir, cfg)
    seed_everything(cfg.seed)
    torch.manual_seed(cfg.seed)
    methods = cfg.method_list
    n_policies = len([m for m in methods if m != "bon"])
    # base, SFT, comparisons, RM; each policy trained and evaluated; SFT evaluated; best-of-N; report
    stages = Stages(4 + 2 * n_policies + 1 + ("bon" in methods) + 1)
    skipped: dict[str, str] = {}
    with stages.stage("base model"):
        base = base_model(cfg, out)
    with stages.stage("supervised fine-tuning"):
        sft_path = run_sft(cfg, base, out)
    with stages.stage("simulated human comparisons"):
        prefs, counts = collect_comparisons(cfg, sft_path, out)
    stages.console.print(f"  {counts['kept']} comparisons ({counts['ties_skipped']} ties, {counts['identical_skipped']} "
                         f"identical pairs and {counts['empty_skipped']} with an empty response left out)")
    with stages.stage("reward model"):
        rm_path = run_reward(cfg, sft_path, prefs, out)
        rm_eval = reward_model_accuracy(cfg, sft_path, rm_path, out)
    stages.console.print(f"  held-out accuracy on {rm_eval['rm_accuracy']['n']} new comparisons: "
                         f"{rm_eval['rm_accuracy']['mean']:.3f} (annotator labels), "
                         f"{rm_eval['gold_accuracy']['mean']:.3f} (noise-free panel order)")
    policies: dict[str, str] = {}
    for name, fn, args in (("ppo", run_ppo, (rm_path,)), ("dpo", run_dpo, (prefs,))):
        if name not in methods:
            continue
        try:
            with stages.stage(name.upper()):
                policies[name] = fn(cfg, sft_path, *args, out)
        except ImportError as e:  # an optional dependency a stage reaches for is reported, not fatal
            skipped[name] = f"recipe not available: {e}"
            stages.skip(name.upper(), skipped[name])
    results, alarms = evaluate_all(cfg, sft_path, rm_path, policies, out, stages)
    rows = win_rate_table(results)
    seconds = time.perf_counter() - t0
    summary = {"win_rates": rows, "stage_seconds": stages.times, "stage_cpu_seconds": stages.cpu,
               "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds() - c_start, 1), "skipped": skipped,
               "comparisons": counts, "reward_model": rm_eval, "alarms": alarms, "paths": {"base": base, "sft": sft_path, "reward_model": rm_path, **policies}}
    atomic_write_json(out / "summary.json", summary)
    with stages.stage("report"):
        report = write_report(out, title="rlhfkit demo: say it kindly")
    summary["report"] = str(report)
    print_table(rows, report, time.perf_counter() - t0, alarms)
    return summary
