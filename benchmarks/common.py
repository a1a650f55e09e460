"""Artifacts the quality benchmarks share, built once and cached under benchmarks/work/.

`sft_policy()` is policy_0 of the bundled task: the shipped base model after SFT with
configs/sft_kindly.yaml. Builders take a file lock, so benchmarks started side by side
build each artifact once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "work"
CONFIGS = ROOT / "configs"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_model() -> Path:
    from rlhfkit.tasks import kindly

    return Path(kindly.base_model_path())


# The speed benchmarks' fixed workload: the byte-level BPE tokenizer (4,096 entries) that the
# bundled task used before its word-level tokenizer (17,073 entries, docs/task.md). Their tiny
# models take its vocabulary, so the measured ratios stay comparable from run to run; with the
# word-level vocabulary the output layer, the same work on both sides, would be most of a step.
SPEED_TOKENIZER = str(Path(__file__).resolve().parent / "data" / "bpe_tokenizer")


def stamp(model_dir: Path | str) -> str:
    """Size and modification time of a checkpoint's weights: a cache key that changes when the
    checkpoint is rebuilt (a retrained base must not reuse results computed from the old one)."""
    st = (Path(model_dir) / "model.safetensors").stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def sft_policy() -> Path:
    """Path of the bundled task's SFT policy (trained on first use, about a few minutes; one per
    build of the shipped base)."""
    out = WORK / f"sft-{stamp(base_model())}"
    final = out / "final"
    with locked("sft"):
        if not (final / "model.safetensors").is_file():
            from rlhfkit.config import load_yaml_config
            from rlhfkit.recipes import sft

            cfg = load_yaml_config(sft.Config, CONFIGS / "sft_kindly.yaml")
            cfg.output_dir = str(out)
            cfg.progress = False
            sft.main(cfg)
    return final


def peer_available(name: str = "trl", attr: str | None = None) -> bool:
    """Whether the peer library (and, if given, one of its classes) can be imported here."""
    import importlib

    try:
        module = importlib.import_module(name)
    except ImportError:
        return False
    return attr is None or hasattr(module, attr)


# ---------------------------------------------------------------------------------------------
# equal-work speed comparisons (every speed benchmark, CPU and GPU)

LOSS_RTOL = 1e-4


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages: read a speed figure against how busy the cores were."""
    import os

    return [round(x, 2) for x in os.getloadavg()]


def losses_agree(a: float | None, b: float | None, rtol: float = LOSS_RTOL) -> tuple[bool, str]:
    """Whether two first-step losses agree to `rtol` relative; the reason when they do not."""
    if a is None or b is None:
        return False, "a side did not report its first-step loss"
    if a != a or b != b:
        return False, f"a first-step loss is NaN (ours {a}, peer {b})"
    rel = abs(a - b) / max(abs(a), abs(b), 1e-12)
    if rel > rtol:
        return False, (f"first-step losses differ by {rel:.2e} relative (ours {a:.6g}, peer {b:.6g}), more than "
                       f"{rtol:g}: the two sides did not do the same computation, so their speeds are not compared")
    return True, ""


def paired_comparison(ours: list[dict], peer: list[dict], work: float | None = None,
                      higher_is_better: bool = False, deterministic: bool = False) -> dict:
    """Summarise alternating runs of both sides into the fields every speed benchmark reports.

    Each run is a dict with `seconds`, `loss_first` and `loss_last`; run i of ours is paired
    with run i of the peer (they ran next to each other, so under a changing load they saw
    about the same machine). The ratio is the peer's time over ours (higher is better for
    rlhfkit); its median and spread over the pairs are reported, and only when the first-step
    losses agree to LOSS_RTOL relative in every pair. With `deterministic` (no sampling: SFT,
    reward, DPO), the last-step losses must agree too: a first DPO loss is ln 2 whatever either
    side computes, and only the losses after some updates show the two trained alike. With `work` (tokens, samples ...) the
    medians are also given as throughput.
    """
    def side(runs):
        if not runs:
            return None
        med = statistics.median(r["seconds"] for r in runs)
        out = {"seconds": round(med, 4), "seconds_runs": [round(r["seconds"], 4) for r in runs],
               "loss_first": runs[0].get("loss_first"), "loss_last": runs[0].get("loss_last")}
        if work:
            out["per_second"] = round(work / med, 2)
        return out

    result = {"ours_side": side(ours), "peer_side": side(peer),
              "loss_first": {"ours": ours[0].get("loss_first") if ours else None,
                             "peer": peer[0].get("loss_first") if peer else None},
              "loss_last": {"ours": ours[0].get("loss_last") if ours else None,
                            "peer": peer[0].get("loss_last") if peer else None},
              "ratio": None, "ratio_runs": [], "ratio_spread": None, "comparable": False, "not_compared_because": None}
    if not peer:
        result["not_compared_because"] = "the peer library is not installed"
        return result
    reasons = []
    for o, p in zip(ours, peer):
        ok, why = losses_agree(o.get("loss_first"), p.get("loss_first"))
        if not ok:
            reasons.append(why)
        if deterministic:
            ok, why = losses_agree(o.get("loss_last"), p.get("loss_last"))
            if not ok:
                reasons.append(why.replace("first-step", "last-step").replace("its first-step", "its last-step"))
    if reasons:
        result["not_compared_because"] = reasons[0]
        return result
    ratios = [p["seconds"] / o["seconds"] for o, p in zip(ours, peer)]
    result.update(ratio=round(statistics.median(ratios), 3), ratio_runs=[round(r, 3) for r in ratios],
                  ratio_spread=[round(min(ratios), 3), round(max(ratios), 3)], comparable=True)
    return result


def cuda_or_say_why(name: str) -> bool:
    """True with a CUDA device; otherwise print the one line a GPU benchmark gives on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        return True
    print(f"{name}: no CUDA device on this machine; nothing measured (run it where `torch.cuda.is_available()`)")
    return False


def qwen05b_config(vocab_size: int = 151936, **overrides):
    """A Qwen2.5-0.5B-shaped LlamaConfig (24 layers, hidden 896, 14 heads, 2 KV heads, FFN 4864,
    tied 151936-token embedding: about 494M parameters); random weights, nothing from a hub."""
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab_size, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096,
               tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def sync(device) -> None:
    """Wait for queued GPU work (a no-op on CPU) so wall-clock timings cover it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write counted), best of `repeats`."""
    import time

    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


def measure_matmul_peak(device, dtype, n: int = 8192, repeats: int = 10) -> float:
    """Best dense matmul FLOP/s for `dtype` on `device` (2 n^3 per product)."""
    import time

    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def start_policy_server(args: list[str], port: int, threads: int | None = None,
                        timeout_s: float = 300) -> subprocess.Popen:
    """`rlhfkit serve-policy ARGS --port PORT` in a subprocess, returned once /health answers 200;
    a server that exits or does not answer in `timeout_s` raises with the end of its stderr."""
    import httpx  # the serve extra

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.serving.server", *args, "--port", str(port),
                             "--log_level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the server exited: " + proc.stderr.read().decode()[-2000:])
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start in {timeout_s:.0f} s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
