"""`rlhfkit <command>`: one entry point, one recipe per command.

Each command names a module. A module either exposes ``cli(argv)`` (commands with
positional arguments or sub-commands) or a ``Config`` dataclass plus ``main(cfg)``, in
which case `--config FILE.yaml` and `--field value` overrides are parsed here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import torch.distributed as dist

from rlhfkit import __version__
from rlhfkit.config import parse_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.runs import (
    claim_run_folder,
    discard_unfinished_run,
    has_saved_state,
    run_folder_owned,
)

# name -> (module, one-line summary). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rlhfkit.recipes.demo", "Run the whole loop on the bundled task and write a report"),
    "pretrain": ("rlhfkit.recipes.pretrain", "Pretrain a small causal LM on a text corpus"),
    "sft": ("rlhfkit.recipes.sft", "Supervised fine-tuning on prompt/completion or messages data"),
    "sample": ("rlhfkit.recipes.sample", "Generate responses from a policy for a prompt file"),
    "label": ("rlhfkit.recipes.label", "Label response pairs or rankings with simulated annotators or a judge"),
    "cai-revise": ("rlhfkit.recipes.cai", "Constitutional AI (SL-CAI): sample, critique, revise N times -> SFT records"),
    "agreement": ("rlhfkit.eval.agreement", "Agreement of two label sources (human, simulated, AI judges): kappa, alpha, biases"),
    "reward": ("rlhfkit.recipes.reward", "Train a reward model from preferences or rankings"),
    "eval-rm": ("rlhfkit.eval.rm_eval", "Evaluate a reward model on preference data"),
    "ppo": ("rlhfkit.recipes.ppo", "PPO with a KL penalty against a reward model"),
    "grpo": ("rlhfkit.recipes.grpo", "GRPO: group-normalised advantages, no critic"),
    "rloo": ("rlhfkit.recipes.rloo", "RLOO: REINFORCE with a leave-one-out baseline"),
    "dpo": ("rlhfkit.recipes.dpo", "DPO and relatives (IPO, hinge, robust, SimPO, KTO, ORPO)"),
    "ilql": ("rlhfkit.recipes.ilql", "ILQL: offline RL from logged responses with scalar rewards (value and Q heads)"),
    "best-of-n": ("rlhfkit.recipes.best_of_n", "Best-of-N sampling against a reward model or judge"),
    "rejection-sampling": ("rlhfkit.recipes.rejection_sampling", "Expert iteration: sample, keep the best, SFT, repeat"),
    "red-team": ("rlhfkit.recipes.red_team", "Red teaming: a red model writes attacks; those that make the target fail are kept"),
    "eval": ("rlhfkit.eval.run_eval", "Evaluate a policy: gold/proxy reward, KL, win rate, diversity, perplexity"),
    "report": ("rlhfkit.eval.report", "Write a self-contained HTML report for a run folder"),
    "loop": ("rlhfkit.recipes.loop", "Iterative RLHF: R rounds of sample, label, reward model, policy update"),
    "models": ("rlhfkit.models.registry", "Model registry: list, show, promote, rollback"),
    "serve": ("rlhfkit.feedback.cli", "Human-feedback collection service (web app + API)"),
    "ab": ("rlhfkit.serving.ab_cli", "A/B experiments on live traffic: report, promote, rollback, export feedback"),
    "serve-policy": ("rlhfkit.serving.server", "OpenAI-compatible policy server (batched; registry models, folders, the bundled base)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"rlhfkit {__version__}: the whole RLHF loop", "", "usage: rlhfkit <command> [--help] [--config FILE.yaml] [--field value ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhfkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "cli"):
        return int(module.cli(rest) or 0)

    out = existed = None
    try:
        cfg = parse_config(module.Config, rest, prog=f"rlhfkit {name}", description=module.__doc__)
        out = getattr(cfg, "output_dir", None)
        if out and hasattr(cfg, "overwrite"):  # training commands: one run per folder
            existed = claim_run_folder(out, getattr(cfg, "resume", False), cfg.overwrite)
        with run_folder_owned():  # checked just above
            module.main(cfg)
    except KeyboardInterrupt:
        saved = out is not None and has_saved_state(out)
        if out is not None and existed is not None:
            discard_unfinished_run(out, existed)
        hint = (f"resume with the same command and --resume true (checkpoints in {out}/checkpoints)" if saved
                else "nothing was saved yet; run the command again (set --save_steps to checkpoint along the way)")
        print(f"\nrlhfkit {name}: interrupted; {hint}", file=sys.stderr)
        return 130
    except RlhfkitError as e:
        if out is not None and existed is not None:
            discard_unfinished_run(out, existed)
        print(f"rlhfkit {name}: {e}", file=sys.stderr)
        return 2
    except BaseException:
        if out is not None and existed is not None:
            discard_unfinished_run(out, existed)
        raise
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """End a multi-process launch with every process leaving the group together: a process that exits
    while another still has gloo traffic with it can abort the other at interpreter exit."""

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
