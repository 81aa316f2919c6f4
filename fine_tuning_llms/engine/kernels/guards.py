"""When the fused nodes may run: the library releases they are tested with, the LlamaAttention
signature the attention node calls, and the private torch ops some nodes need.

The nodes lean on code that is not a public API. The LoRA node reads PEFT's layer attributes
(``lora_A``/``lora_B``, ``scaling``, ``lora_variant``, ``active_adapters``, ``merged``...), the
attention node calls each class's own forward with ``LlamaAttention.forward``'s arguments in order, and the head node
assumes the causal LMs it takes make their logits as ``lm_head(hidden)`` with nothing else. Any of
these can change in a minor release without a warning, so outside the tested releases the fused
paths stay off and the model's own code runs.

Private torch ops (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``,
``torch.ops.mkldnn._linear_pointwise``...) are looked up only when a node is about to use them,
never at import: a torch build without them still imports this package and trains, and a node
whose ops are missing is simply not used.
"""
from __future__ import annotations

import inspect
import re

import torch

# The transformers and PEFT releases the fused paths are tested with (tests/test_kernels.py,
# tests/test_packing_families.py, the speed-lever test in tests/test_fine_tuning.py): inclusive
# (oldest, newest) major.minor series, patch releases of them included. Widen a range only after
# those tests pass on the new release; pyproject.toml's dependency ranges say the same.
TESTED_VERSIONS = {"transformers": ("5.24", "5.24"), "peft": ("0.21", "0.21")}

# The bitsandbytes releases whose CPU training product (MatMul8bitFp) the 8-bit LoRA node reproduces
# (tests/test_int8_lora.py). Only that node depends on it: outside it, 8-bit layers keep PEFT's code.
BITSANDBYTES_TESTED = ("0.50", "0.50")

# LlamaAttention.forward as the attention node calls it: these arguments, positionally, in this order.
ATTENTION_PARAMETERS = ("self", "hidden_states", "position_embeddings", "attention_mask", "cache", "kwargs")


def installed_versions() -> dict[str, str]:
    """The installed releases of the libraries in ``TESTED_VERSIONS``."""
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


def _series(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def bitsandbytes_tested() -> bool:
    """Whether the installed bitsandbytes is in ``BITSANDBYTES_TESTED``."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001 - an unusable bitsandbytes means there are no 8-bit layers to route
        return False
    series, (oldest, newest) = _series(bitsandbytes.__version__), (_series(v) for v in BITSANDBYTES_TESTED)
    return series is not None and oldest <= series <= newest


def _tested_range(name: str) -> str:
    oldest, newest = TESTED_VERSIONS[name]
    return f"{oldest}.x" if oldest == newest else f"{oldest}.x-{newest}.x"


def untested_versions() -> dict[str, str]:
    """The installed libraries outside ``TESTED_VERSIONS``, name -> version; empty when all are tested."""
    untested = {}
    for name, version in installed_versions().items():
        oldest, newest = (_series(v) for v in TESTED_VERSIONS[name])
        series = _series(version)
        if series is None or not oldest <= series <= newest:
            untested[name] = version
    return untested


def attention_signature_matches(cls: type | None = None) -> bool:
    """Whether ``cls.forward`` (default LlamaAttention's) still takes the arguments the attention
    node passes on."""
    if cls is None:
        from transformers.models.llama.modeling_llama import LlamaAttention as cls

    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return (tuple(p.name for p in parameters) == ATTENTION_PARAMETERS
            and all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters[:-1])
            and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD)


def fused_paths_refused(check_signature: bool = True) -> str | None:
    """Why the fused paths must stay off with the installed libraries (one line), or None where they may run."""
    untested = untested_versions()
    if untested:
        tested = " and ".join(f"{name} {_tested_range(name)}" for name in TESTED_VERSIONS)
        found = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
        return (f"Fused kernels off: they are tested with {tested}, this environment has {found}; "
                "training takes PEFT's and transformers' own code (--fused_kernels false silences this)")
    if check_signature and not attention_signature_matches():
        return (f"Fused kernels off: LlamaAttention.forward in transformers {installed_versions()['transformers']} "
                f"no longer takes ({', '.join(ATTENTION_PARAMETERS[1:-1])}, **kwargs); training takes PEFT's and "
                "transformers' own code (--fused_kernels false silences this)")
    return None


def qualified_name(cls: type) -> str:
    """``module.ClassName`` of a class: what the nodes' exact type checks compare, without importing
    every model family's module to get the class objects."""
    return f"{cls.__module__}.{cls.__qualname__}"


def private_op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>``, looked up now, or None where this torch build lacks it."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def missing_ops(namespace: str, names: tuple[str, ...]) -> list[str]:
    """The full names of the ops in ``names`` this torch build lacks."""
    return [f"torch.ops.{namespace}.{name}" for name in names if private_op(namespace, name) is None]
