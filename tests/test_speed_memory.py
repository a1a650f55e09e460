"""CPU training keeps freed memory for reuse instead of page-faulting it back in every step."""

import subprocess
import sys
import textwrap

import pytest

STEPS = textwrap.dedent("""
    import resource
    import torch
    from rlhfkit.train.accelerator import keep_freed_memory
    def step():  # a step's activations: four 8 MiB blocks, all freed at its end
        blocks = [torch.ones(2 << 20) for _ in range(4)]
        del blocks
    def faults():  # minor page faults of 30 steps
        step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(30):
            step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    default = faults()
    assert keep_freed_memory()
    print(default, faults())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_repeated_training_steps_reuse_freed_memory_without_page_faults():
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True)
    default, kept = (int(x) for x in out.stdout.split()[-2:])
    # kept: at most one step's blocks (4 x 2048 pages) fault in while the heap settles, over 30
    # steps; by default glibc hands freed blocks back to the kernel and steps fault them in again
    assert kept <= 4 * 2048 + 64 < default


def test_make_accelerator_on_cpu_keeps_freed_memory(monkeypatch):
    from types import SimpleNamespace

    from rlhfkit.train import accelerator

    calls = []
    monkeypatch.setattr(accelerator, "keep_freed_memory", lambda: calls.append(1) or True)
    accelerator.make_accelerator(SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="no", seed=0))
    assert calls == [1]
