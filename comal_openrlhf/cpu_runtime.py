"""Run OpenRLHF 0.11.2's DPO path on a machine without CUDA.

OpenRLHF assumes CUDA in six places (openrlhf/models/__init__.py, openrlhf/utils/deepspeed/deepspeed.py,
openrlhf/cli/train_dpo.py's defaults) and bf16 hardware in a seventh. ``apply()`` handles each one, and does nothing
at all when ``torch.cuda.is_available()``:

1. ``openrlhf.models`` imports ``flash_attn.bert_padding`` / ``flash_attn.utils.distributed`` at import time. When
   flash-attn cannot be imported (no CUDA extension) a stand-in package with a real ``__spec__`` is registered
   (transformers calls ``importlib.util.find_spec("flash_attn")`` and rejects ``__spec__ = None``). Its functions are
   only reached with ``--ds.packing_samples``, which needs flash attention and is refused on CPU.
2. A plain ``python -m`` launch gets LOCAL_RANK/RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or DeepSpeed would try MPI
   discovery.
3. ``torch.cuda.set_device/synchronize/current_device/empty_cache`` (which can only raise on such a machine) become
   CPU no-ops, and ``init_device_mesh("cuda", ...)`` in the strategy builds a CPU mesh.
4. flash-attn's Triton cross entropy, which ``log_probs_from_logits`` prefers when it imports, is not importable
   from the stand-in, so OpenRLHF falls back to gather + chunked logsumexp.
5. DeepSpeed would JIT-compile ``deepspeed_shm_comm`` and ``fused_adam`` with g++ (minutes): the shm op is marked
   incompatible (gloo is used) and AdamW runs as ``torch.optim.AdamW``; TORCH_EXTENSIONS_DIR points at a
   project-local folder so nothing is written to a shared cache.
6. ``--ds.attn_implementation flash_attention_*`` becomes ``sdpa`` and ``--ds.param_dtype fp16`` becomes bf16 (fp32
   without native bf16; fp16 is refused by DeepSpeed on CPU), each with a printed note; ``--ds.packing_samples`` is a
   clear error.
7. bf16 arithmetic on a CPU without native bf16 is emulated and many times slower than fp32. ``--ds.param_dtype``
   also accepts ``fp32`` (``allow_fp32``: OpenRLHF's ``convert_to_torch_dtype`` in openrlhf/utils/utils.py learns
   it; DeepSpeed trains in fp32 when its bf16 and fp16 sections are both disabled, see
   openrlhf/utils/deepspeed/deepspeed_utils.py), and when the flag was not given on such a CPU
   (``cpu_has_native_bf16()`` False) the run uses fp32, saying so in one line.

The plugin's entry points (``openrlhf.cli.train_comal``, ``python -m comal_openrlhf.cli.run``) call ``apply()``;
users never do.
"""

import argparse
import importlib.machinery
import importlib.util
import os
import sys
import types

from comal_openrlhf.errors import PlanError

_APPLIED = False
DTYPE_FLAG = "--ds.param_dtype"
GIVEN_KEY = "ds.param_dtype_given"  # set by the flag's action; hierarchized into args.ds.param_dtype_given
DTYPE_HELP = (
    " (comal: fp32 is accepted too. On a CPU without native bf16 - no avx512_bf16/amx_bf16 in /proc/cpuinfo, or "
    "torch's CPU kernels not on their AVX512 path, e.g. ATEN_CPU_CAPABILITY=avx2 - bf16 is emulated and many times "
    "slower, so a run that does not give this flag trains in fp32 and says so; pass --ds.param_dtype bf16 to force "
    "bf16.)"
)


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo") -> bool:
    """True when torch's CPU kernels can use native bf16 instructions here.

    All must hold: the CPU advertises avx512_bf16 or amx_bf16 (``cpuinfo`` flags); torch dispatches to its AVX512
    kernels (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2`` pins the AVX2 path, which has
    no bf16 instructions); and oneDNN, which runs torch's bf16 matmuls and picks its own code path, is not capped
    below bf16 by ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``. Without a readable ``cpuinfo`` (not Linux) the
    answer is False.
    """
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if isa not in ("ALL", "DEFAULT") and not any(x in isa for x in ("BF16", "AMX", "AVX10")):
        return False
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    if not {"avx512_bf16", "amx_bf16"} & set(flags):
        return False
    import torch

    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def _patch_convert_dtype():
    """``convert_to_torch_dtype`` (openrlhf/utils/utils.py) accepts "fp32"; Actor and get_llm_for_sequence_regression
    look it up in the module at call time."""
    import torch
    from openrlhf.utils import utils

    original = utils.convert_to_torch_dtype
    if getattr(original, "_comal_fp32", False):
        return

    def convert_to_torch_dtype(param_dtype):
        return torch.float32 if param_dtype == "fp32" else original(param_dtype)

    convert_to_torch_dtype._comal_fp32 = True
    utils.convert_to_torch_dtype = convert_to_torch_dtype


class _DtypeAction(argparse._StoreAction):
    """Stores the value and records that the user gave the flag (the default stays upstream's "bf16")."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN_KEY, True)


def allow_fp32(parser):
    """Let ``--ds.param_dtype`` of an OpenRLHF parser take "fp32" and remember whether it was given.

    Keeps the flag's default; appends to its help how the CPU default is chosen and how to force bf16.
    """
    action = next((a for a in parser._actions if DTYPE_FLAG in a.option_strings), None)
    if action is None:
        return parser
    if action.choices is not None and "fp32" not in action.choices:
        action.choices = list(action.choices) + ["fp32"]
    if DTYPE_HELP not in (action.help or ""):
        action.help = (action.help or "") + DTYPE_HELP
    action.__class__ = _DtypeAction
    parser.set_defaults(**{GIVEN_KEY: False})
    _patch_convert_dtype()
    return parser


def _dtype_given(ds):
    """Whether --ds.param_dtype was on the command line: recorded by ``allow_fp32``'s action, else (an upstream
    parser run through comal_openrlhf.cli.run) read from sys.argv, abbreviations included."""
    given = getattr(ds, "param_dtype_given", None)
    if given is not None:
        return bool(given)
    for tok in sys.argv[1:]:
        name = tok.split("=", 1)[0]
        if len(name) > len("--ds.pa") and DTYPE_FLAG.startswith(name):
            return True
    return False


def _rank0_print(msg):
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _set_single_process_env():
    """Point 2: a plain ``python`` launch is a world of one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # torchrun / deepspeed launcher already set the rendezvous
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # port 0: the single rank hosts the store on a port the kernel picks, so parallel launches never collide
    os.environ.setdefault("MASTER_PORT", "0")


def _flash_attn_missing(*_args, **_kwargs):
    raise RuntimeError(
        "flash-attn is not usable on this machine (no CUDA): sample packing (--ds.packing_samples) and ring "
        "attention need it. Run without --ds.packing_samples on CPU."
    )


def _install_flash_attn_stand_in():
    """Point 1 (and 4): register importable ``flash_attn`` modules that never reach CUDA."""
    try:
        import flash_attn.bert_padding  # noqa: F401
        import flash_attn.utils.distributed  # noqa: F401

        return  # a working flash-attn (or an earlier stand-in) is there
    except Exception:  # ImportError, or a CUDA-less build failing on its extension
        for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            del sys.modules[name]

    from einops import rearrange

    def module(name, is_package=False, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
        if is_package:
            mod.__path__ = []  # no search path: flash_attn.ops.* stays unimportable (point 4)
        mod.__dict__.update(attrs)
        mod.__comal_stand_in__ = True
        sys.modules[name] = mod
        return mod

    # transformers reads flash_attn.__version__ when it decides what is available
    root = module("flash_attn", is_package=True, __version__="0.0.0+cpu-stand-in")
    root.bert_padding = module(
        "flash_attn.bert_padding",
        rearrange=rearrange,
        index_first_axis=_flash_attn_missing,
        pad_input=_flash_attn_missing,
        unpad_input=_flash_attn_missing,
    )
    root.utils = module("flash_attn.utils", is_package=True)
    root.utils.distributed = module("flash_attn.utils.distributed", all_gather=_flash_attn_missing)


def _patch_torch_cuda():
    """Point 3: CUDA bookkeeping calls become no-ops; ``current_device`` names the CPU."""
    import torch

    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_deepspeed():
    """Point 5: no g++ builds. Gloo instead of the shm op, torch AdamW instead of fused_adam."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = here if os.access(here, os.W_OK) else os.path.join(os.path.expanduser("~"), ".cache", "comal_openrlhf")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(root, ".torch_extensions"))
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def adapt_args(args):
    """Point 6: settings that cannot work without CUDA are changed (with a note) or refused."""
    ds = args.ds
    if getattr(ds, "packing_samples", False):
        raise PlanError("--ds.packing_samples needs flash-attn on CUDA; drop it on a CPU-only machine")
    if getattr(ds, "ring_attn_size", 1) > 1:
        raise PlanError("--ds.ring_attn_size > 1 needs flash-attn on CUDA")
    attn = getattr(ds, "attn_implementation", "sdpa")
    if attn and ("flash" in attn or attn.startswith("kernels-community")):
        print(f"[comal cpu] --ds.attn_implementation {attn} needs CUDA; using sdpa.")
        ds.attn_implementation = "sdpa"
    native_bf16 = cpu_has_native_bf16()
    if getattr(ds, "param_dtype", "bf16") == "fp16":
        fallback = "bf16" if native_bf16 else "fp32"
        print(f"[comal cpu] --ds.param_dtype fp16 is not supported by DeepSpeed on CPU; using {fallback}.")
        ds.param_dtype = fallback
    elif getattr(ds, "param_dtype", "bf16") == "bf16" and not native_bf16 and not _dtype_given(ds):
        _rank0_print(
            "[comal cpu] no native bf16 on this CPU (torch CPU path "
            f"{_capability()}): training in fp32, as bf16 would be emulated and many times slower; "
            "pass --ds.param_dtype bf16 to force bf16."
        )
        ds.param_dtype = "fp32"
    if getattr(ds, "adam_offload", False):
        print("[comal cpu] --ds.adam_offload has no meaning without a GPU; ignored.")
        ds.adam_offload = False
    return args


def _capability():
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _patch_openrlhf_strategy():
    """Points 3, 5, 6 inside OpenRLHF's DeepspeedStrategy."""
    import openrlhf.utils.deepspeed.deepspeed as ds_mod
    import torch.distributed.device_mesh as dm

    strategy_cls = ds_mod.DeepspeedStrategy
    if getattr(strategy_cls, "_comal_cpu_patched", False):
        return

    ds_mod.init_device_mesh = lambda _device_type, *a, **k: dm.init_device_mesh("cpu", *a, **k)

    original_init = strategy_cls.__init__

    def __init__(self, *a, **k):
        original_init(self, *a, **k)
        adapt_args(self.args)
        self.param_dtype = self.args.ds.param_dtype
        self.adam_offload = False

    original_train_config = strategy_cls.get_ds_train_config

    def get_ds_train_config(self, optim_dict=None, **k):
        if optim_dict is not None and optim_dict.get("type") == "AdamW":
            optim_dict = {**optim_dict, "params": {**optim_dict["params"], "torch_adam": True}}
        return original_train_config(self, optim_dict, **k)

    strategy_cls.__init__ = __init__
    strategy_cls.get_ds_train_config = get_ds_train_config
    strategy_cls._comal_cpu_patched = True


def apply(force: bool = False) -> bool:
    """Make OpenRLHF's DPO path run on CPU. Returns True when the CPU runtime is active.

    A no-op when CUDA is available (unless ``force``, for tests), and idempotent.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if cuda_available() and not force:
        return False
    _set_single_process_env()
    _install_flash_attn_stand_in()
    _patch_torch_cuda()
    _patch_deepspeed()
    _patch_openrlhf_strategy()
    _patch_convert_dtype()
    _APPLIED = True
    return True
