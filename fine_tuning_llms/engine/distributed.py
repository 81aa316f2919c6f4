"""More than one process: the launch check before training, who prints, and FSDP2 on CPU.

    torchrun --nproc_per_node 2 run_fine_tuning.py --task train                        # DDP
    accelerate launch --config_file examples/accelerate_fsdp.yaml run_fine_tuning.py --task train   # FSDP2

A launcher (torchrun, ``accelerate launch``) starts one process per rank and tells each one its
place through the environment: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.
Every rank runs the same code; only rank 0 prints and writes files.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import NoReturn

import torch

from .errors import UserError

log = logging.getLogger(__name__)

# What a process needs, besides WORLD_SIZE, to find the others and form a process group.
RENDEZVOUS_VARS = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def processes_on_this_machine() -> int:
    """This launch's processes on this machine (``LOCAL_WORLD_SIZE``, which torchrun and ``accelerate
    launch`` set); 1 outside a launch. They share the machine's memory and cores."""
    if world_size() <= 1:
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """Rank 0 of a launch (or a plain run): the one process that prints and writes files."""
    return rank() == 0


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP (``accelerate launch`` with ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def quiet_other_ranks() -> None:
    """On ranks other than 0: log warnings and errors only, draw no progress bar, repeat no Python
    warning (rank 0 shows the same ones). One set of lines on the console, however many processes."""
    if is_main_process():
        return
    os.environ["TQDM_DISABLE"] = "1"  # bars of tqdm imports still to come (tqdm reads it once, at import)
    import tqdm.std

    original = tqdm.std.tqdm.__init__  # ... and bars of the tqdm already imported, whatever they pass

    def silent_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = silent_init
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("fine_tuning_llms", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def check_launch(*, load_4bit: bool, load_8bit: bool, device: torch.device) -> None:
    """Stop before loading anything when several processes were asked for but cannot train together.

    - ``WORLD_SIZE`` > 1 set by hand (or left over in the shell) without the rest of a launch: the
      process would wait forever for partners that were never started.
    - an FSDP launch where FSDP cannot run: 8/4-bit weights on CPU (FSDP shards bitsandbytes weights
      only through a floating quant-storage dtype on GPU), or FSDP version 1 on CPU.
    """
    size = world_size()
    if size > 1:
        missing = [name for name in RENDEZVOUS_VARS if not os.environ.get(name)]
        if missing or not torch.distributed.is_available():
            what = (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set" if missing
                    else "this torch build has no torch.distributed")
            raise UserError(f"WORLD_SIZE={size} asks for {size} processes but {what}, so they cannot form a process "
                            f"group; start the run with `torchrun --nproc_per_node {size} run_fine_tuning.py ...` or "
                            "`accelerate launch --config_file CONFIG run_fine_tuning.py ...`, or unset WORLD_SIZE "
                            "for one process")
        backend_ok = torch.distributed.is_nccl_available() if device.type == "cuda" else torch.distributed.is_gloo_available()
        if not backend_ok:
            raise UserError(f"no {'NCCL' if device.type == 'cuda' else 'gloo'} backend in this torch build for a "
                            f"{size}-process run on {device.type}; install a torch build with it or run one process")
    if not fsdp_requested():
        return
    if device.type == "cpu" and (load_4bit or load_8bit):
        flag = "--load_4bit" if load_4bit else "--load_8bit"
        raise UserError(f"FSDP cannot shard {flag} weights on CPU (bitsandbytes' quant-storage dtype for FSDP needs "
                        f"a GPU); drop {flag}, or launch with `torchrun --nproc_per_node N` (DDP, every process "
                        "holds the whole k-bit model)")
    if device.type == "cpu" and os.environ.get("FSDP_VERSION", "2") != "2":
        raise UserError("FSDP version 1 does not run on CPU here; set `fsdp_version: 2` in the accelerate config "
                        "(examples/accelerate_fsdp.yaml)")


def check_wrap_classes(model) -> list[str]:
    """The decoder-layer classes FSDP shards one by one: the launch config's
    ``fsdp_transformer_layer_cls_to_wrap`` if it names any, else the model's own ``_no_split_modules``
    (what accelerate uses when the config leaves the name out). A name the model does not contain
    stops here, before training, with the model's own class named."""
    own = list(getattr(model, "_no_split_modules", None) or [])
    named = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    present = {type(m).__name__ for m in model.modules()}
    unknown = [c for c in named if c not in present]
    if unknown:
        raise UserError(f"the FSDP config wraps {', '.join(unknown)}, which this model does not contain; remove "
                        "fsdp_transformer_layer_cls_to_wrap from the accelerate config (the model's own "
                        f"{', '.join(own) or 'decoder layer'} is then used) or name that class")
    return named or own


def use_fsdp_on_cpu(accelerator) -> bool:
    """Make an FSDP launch shard on CPU too; True when it switched.

    accelerate 1.15 takes FSDP only on accelerators (its FSDP branch sits under the GPU types) and
    silently trains a CPU launch with an FSDP config as plain DDP. torch's FSDP2 (``fully_shard``)
    runs on CPU with gloo, so the plugin that accelerate would have built from the launch's
    FSDP_* variables is attached here, before Trainer prepares the model; the rest (sharding by
    decoder layer, sharded checkpoints, resume) is accelerate's and Trainer's own FSDP path.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... from the launch
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def describe_launch(trainer) -> str | None:
    """One line on how the processes share the work (None for one process)."""
    args = trainer.args
    if args.world_size <= 1:
        return None
    machines = max(args.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size) or 1), 1)
    state = trainer.accelerator.state
    kind = "FSDP2, each holds a part of the model" if trainer.is_fsdp_enabled else "DDP, each holds the whole model"
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return (f"{args.world_size} processes on {machines} machine{'s' if machines > 1 else ''} train one model "
            f"({kind}; {getattr(state, 'backend', None) or 'default'} backend): each step takes "
            f"{per_step * args.world_size} examples, {per_step} per process; rank 0 prints and writes files")


def close_process_group() -> None:
    """Destroy the launch's process group before the interpreter exits. Left to interpreter shutdown,
    gloo's worker threads are torn down while still joinable and a rank can abort with "terminate
    called without an active exception" after its work is done (pytorch/pytorch#190489), which fails
    the whole launch. A local call, no collective, so it is safe on the error path too."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_launched_rank(status: int) -> NoReturn:
    """End a launched rank with ``status`` once ``main`` has returned, without interpreter teardown.
    ``close_process_group`` is not enough under FSDP2: after it (and a gc.collect), rank 1's FSDP
    state still held the group through references Python's collector cannot see, so the group and
    its gloo threads were destroyed only during finalisation, where a finished rank could still
    abort and fail the whole launch (seen in CI after ``final_model/`` was written). By now every
    output is written and closed (atomic writes), the lock released and the group destroyed; the
    toolkit registers no atexit work in a launched rank, so only the streams need flushing."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def is_sharded(model) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


def shard_counts(model) -> list[tuple[int, int]]:
    """(values held by this rank, values in the model) for every rank, gathered to all ranks.
    A collective: every rank calls it at the same point."""
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    counts: list = [None] * world_size()
    torch.distributed.all_gather_object(counts, (held, total))
    return counts


def sum_over_ranks(*values: int) -> list[int]:
    """Each value summed over all ranks (a collective when several processes run; else unchanged)."""
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return [int(v) for v in total.tolist()]


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained (adapter) weights, whole, on CPU: each sharded one gathered from every rank.
    A collective: every rank calls it; the frozen base weights are never gathered."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = full.detach().to("cpu").clone()
    return state
