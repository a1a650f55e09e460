"""Sharded training (FSDP2, DeepSpeed ZeRO) through accelerate: the two places rlhfkit must help.

accelerate does the sharding itself from the config files in configs/accelerate/. Two gaps
are filled here:

* accelerate only turns on FSDP for accelerator devices; a CPU process group launched with an
  FSDP config silently trains as plain data parallel. :func:`enable_fsdp_on_cpu` switches such
  a run to FSDP2 (torch's `fully_shard` works over gloo), so the sharded code path is what the
  CPU tests run, not a stand-in.
* a sharded model cannot be saved by one process: its parameters live in pieces on every rank.
  :func:`full_state_dict` gathers them (a collective: every process must call it) for the main
  process to write one ordinary safetensors checkpoint.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhfkit.errors import ConfigError


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """Make a multi-process CPU run launched with an FSDP config actually shard (FSDP2).

    Returns True when it switched the run. accelerate's AcceleratorState lists FSDP only for
    GPU-like device types (state.py, "MULTI_CPU" is absent from that list), so without this a CPU
    launch of configs/accelerate/fsdp2_*.yaml would test DDP under an FSDP name.
    """
    if accelerator.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return False

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 needs CUDA)")

    # AcceleratorState re-reads distributed_type from PartialState's shared dict each time one
    # is constructed (accelerate does so inside prepare), so both must say FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    accelerator.print(f"FSDP2 on CPU: parameters sharded over {accelerator.num_processes} processes (gloo)")
    return True


def is_sharded(accelerator: Accelerator) -> bool:
    """Parameters are split across processes (FSDP, or DeepSpeed ZeRO stage 3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


def shard_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the reference of PPO/GRPO/RLOO) like the trained one under FSDP2, so no
    process holds a whole copy; unchanged otherwise. accelerate's `prepare` takes FSDP2 models only
    with an optimiser, so its per-model step (one unit per decoder layer) is called directly."""
    if not (is_sharded(accelerator) and accelerator.is_fsdp2):
        return model

    name = type(model).__name__
    model.requires_grad_(False)
    model = fsdp2_prepare_model(accelerator, model)
    accelerator.print(f"FSDP2: frozen {name} sharded over {accelerator.num_processes} processes")
    return model


def shard_layers_of(wrapper: torch.nn.Module, inner: torch.nn.Module) -> None:
    """Give a module that holds a transformers model (a reward head, a critic) the decoder layer
    classes of that model, so accelerate's FSDP transformer auto-wrap makes one unit per layer
    (it reads `_no_split_modules` from the module it prepares) instead of one for the whole model."""
    wrapper._no_split_modules = getattr(inner, "_no_split_modules", None)


def forward_is_collective(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` all-gathers sharded parameters (FSDP2 units in it, e.g. a
    sharded policy or a LoRA policy's reference view of it): every process must then run the
    same number of forwards, or the ones left waiting hang."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main process when they are sharded, else None.

    Every process must call it (it all-gathers the shards). None means "save the module as it
    is": its parameters are already whole on the main process.
    """
    if not is_sharded(accelerator):
        return None
    if accelerator.is_fsdp2:
        # accelerate asks for broadcast_from_rank0, which on a gloo group hands back DTensors
        # instead of whole tensors; plain full_state_dict + cpu_offload gathers onto rank 0.

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) module of `model`'s class holding `state_dict`, for save_pretrained.

    The sharded module itself cannot be handed to save_pretrained even with a gathered state
    dict: transformers inspects the module's own (distributed) parameters for tied weights,
    which is a collective the other processes never join. The copy is built on the meta device
    and takes the gathered tensors without another allocation.
    """
    cls = type(model)
    try:  # fully_shard swaps the class for a subclass of FSDPModule and cls: build cls itself
        from torch.distributed.fsdp import FSDPModule

        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    except ImportError:
        pass
    with torch.device("meta"):
        plain = cls(model.config)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    plain.tie_weights()
    still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(f"gathered weights do not fit {type(model).__name__}: missing {still_meta}, "
                           f"unexpected {unexpected}")
    for name, buf in plain.named_buffers():  # non-persistent buffers (rotary tables) are not in state dicts
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            src = model.get_buffer(name)
            plain.get_submodule(owner).register_buffer(leaf, src.detach().cpu().clone(), persistent=False)
    return plain
