"""Load a LLaVA model and its processor by alias, hub id or local directory — offline-friendly."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from saturation.core.adapters import ALIASES, IMAGE_ONLY_PROCESSORS, spec_for_config
from saturation.core.errors import ToolkitError, first_line

DATA_SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"
TINY_DIR = DATA_SAMPLES / "tiny-llava"
# The embedded models by name (data_samples/README.md): `tiny` (the default; auxiliary losses on what the probe
# measures), `tiny-clean` (answer loss alone, weaker) and `tiny-staged` (LLaVA's staging on a text-trained LM,
# answer losses only: its probe curves are emergent).
EMBEDDED = {"tiny": TINY_DIR, "tiny-clean": DATA_SAMPLES / "tiny-clean", "tiny-staged": DATA_SAMPLES / "tiny-staged"}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """Map an alias (an `EMBEDDED` name, or one of `ALIASES`) to a local directory or hub id; pass others through."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return str(EMBEDDED[name])
    return ALIASES.get(name, name)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """`None` means fp32 on CPU (fast and exact there) and the checkpoint's own dtype on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ToolkitError(f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when present, else CPU. Anything else must exist on this machine: checked here, before
    any work, because torch only fails at the first tensor moved there (with a traceback)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ToolkitError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ToolkitError(f"device '{device}': MPS is not available on this machine; use --device cpu")
        return dev
    if dev.type != "cuda":
        raise ToolkitError(f"device '{device}' is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ToolkitError(f"device '{device}': CUDA is not available on this machine ({why}); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ToolkitError(f"device '{device}' does not exist: this machine has {count} CUDA device(s), "
                           f"cuda:0..cuda:{count - 1}")
    return dev


def hub_reachable() -> bool:
    """A quick DNS check, so an offline machine fails in milliseconds instead of after the hub's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _offline_message(resolved: str) -> str:
    return (f"cannot load '{resolved}': it is not a local directory, not in the Hugging Face cache, and the hub "
            f"is unreachable. Download it where the hub is reachable (`hf download {resolved}`) and pass that "
            f"directory with --model PATH")


def load_config(name_or_path: str | os.PathLike):
    """Read the model config (cache or local first, hub only if reachable), refusing models that are not LLaVA."""
    resolved = resolve_name(name_or_path)
    local = Path(resolved).is_dir()
    if resolved == str(TINY_DIR) and not local:
        raise ToolkitError(f"the embedded model is missing from {TINY_DIR}; reinstall the package")
    try:
        config = AutoConfig.from_pretrained(resolved, local_files_only=True)
    except (OSError, ValueError) as err:
        if local:
            raise ToolkitError(f"cannot read a model config in '{resolved}': {first_line(err)}") from None
        if not hub_reachable():
            raise ToolkitError(_offline_message(resolved)) from None
        try:
            config = AutoConfig.from_pretrained(resolved)
        except (OSError, ValueError) as err2:
            raise ToolkitError(f"cannot load '{resolved}': {first_line(err2)}") from None
    spec_for_config(config)  # raises "not a LLaVA model" for any family without a backbone adapter
    return config


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """Load `(model, processor)` for a LLaVA checkpoint, in eval mode, on `device` in `dtype`.

    `device_map` (``auto``, ``balanced``, ``sequential`` or an explicit map) places the layers across GPUs, CPU and
    disk with accelerate instead of one `device`; `max_memory` caps each (``"0=20GiB,1=20GiB,cpu=64GiB"`` or a
    dict), and layers beyond every cap are offloaded to `offload_folder` (default: a temporary folder).

    `name_or_path`: ``tiny`` (the embedded model in ``data_samples/``), an alias (`ALIASES`: LLaVA-1.5, LLaVA-NeXT,
    LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, Gemma 3), a hub id or a local directory. A OneVision or Qwen processor is
    built for images only when its video processor cannot be (no torchvision). `attn_implementation` defaults to ``sdpa``;
    the probe asks for ``eager`` because only eager attention returns attention weights.
    """
    resolved = resolve_name(name_or_path)
    config = load_config(resolved)
    if device_map is not None and device is not None:
        raise ToolkitError("--device and --device-map exclude each other: --device-map places every layer itself")
    dev = resolve_device(device) if device_map is None else _map_main_device(device_map)
    placement, scratch = {"device_map": str(dev)}, None
    if device_map is not None:
        # our own temporary offload folder goes with the model (or with a failed load); a given one is the user's
        scratch = None if offload_folder else tempfile.mkdtemp(prefix="dpvr-offload-")
        placement = {"device_map": device_map, "max_memory": parse_max_memory(max_memory),
                     "offload_folder": str(offload_folder or scratch)}
    local_only = Path(resolved).is_dir() or not hub_reachable()
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            resolved,
            config=config,
            dtype=resolve_dtype(dtype, dev),
            attn_implementation=attn_implementation or "sdpa",
            local_files_only=local_only,
            **placement,
        )
        processor = load_processor(resolved, config, local_only)
    except (OSError, ValueError, ImportError) as err:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if local_only and not Path(resolved).is_dir():
            raise ToolkitError(_offline_message(resolved)) from None
        raise ToolkitError(f"cannot load '{resolved}': {first_line(err)}") from None
    model.eval()
    model.name_or_path = resolved
    if scratch is not None:  # deleted when the model is collected, or at exit
        weakref.finalize(model, shutil.rmtree, scratch, ignore_errors=True)
    return model, processor


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")



load_llava = load_model  # the name before the other families; kept for one release

def _map_main_device(device_map: str | dict) -> torch.device:
    """Where a device-mapped model's inputs start (and which dtype default applies): the first GPU if any."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ToolkitError(f"unknown --device-map '{device_map}': use one of {', '.join(DEVICE_MAPS)}")
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def weights_in_place(module: torch.nn.Module):
    """Inside, every weight of `module` is real even where a device map offloaded it to CPU or disk (accelerate
    keeps meta tensors there and brings the weights in per call): for reading or copying weights outside a call."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            stack.enter_context(align_module_device(m))
        yield module


def check_placement(device: str | None, device_map: str | dict | None, max_memory: str | dict | None) -> None:
    """Refuse, before any work, a device that is not here, an unknown device map, malformed memory caps, or
    --device together with --device-map (the map places every layer itself)."""
    if device_map is None:
        if max_memory is not None:
            raise ToolkitError("--max-memory goes with --device-map (it caps what each device of the map holds)")
        if device is not None:
            resolve_device(device)
        return
    if device is not None:
        raise ToolkitError("--device and --device-map exclude each other: --device-map places every layer itself")
    _map_main_device(device_map)
    parse_max_memory(max_memory)


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> {0: 21474836480, 1: ..., "cpu": 68719476736} (accelerate's `max_memory`,
    in bytes); a device named twice, a GPU this machine does not have, or a size that is not one is one line."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        gpu = re.fullmatch(r"[0-9]{1,4}", key, re.ASCII) is not None  # str.isdigit() also takes ６ and ٦
        if not sep or not size or not (gpu or key in ("cpu", "disk", "mps")):
            raise ToolkitError(f"--max-memory '{text}': write DEVICE=SIZE pairs, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
        device = int(key) if gpu else key
        if device in out:  # the last one would win silently
            raise ToolkitError(f"--max-memory '{text}' caps {key} twice: give each device once")
        if gpu and device >= (count := torch.cuda.device_count()):
            caps = f"0..{count - 1}, cpu or disk" if count else "cpu or disk"
            raise ToolkitError(f"--max-memory '{text}' caps GPU {key}, but this machine has {count} CUDA device(s): "
                               f"cap {caps}")
        out[device] = memory_size(size, text)
    return out


_SIZE = re.compile(r"(?P<number>[0-9]{1,15}(?:\.[0-9]{1,15})?)\s*(?P<unit>[KMGT]i?B)?", re.ASCII | re.IGNORECASE)
_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def memory_size(size: str, text: str) -> int:
    """One --max-memory size in bytes: a plain number of bytes or a number with KB..TB / KiB..TiB (any case), more
    than 0 and under 1 EiB. accelerate's own reading turns ``1e400GiB`` into an OverflowError and ``1Gb`` into
    bits, so the toolkit reads the size and hands accelerate the byte count."""
    m = _SIZE.fullmatch(size)
    if m is None:
        raise ToolkitError(f"--max-memory '{text}': '{size}' is not a size: write e.g. 20GiB, 512MiB or 64GB")
    total = float(m["number"]) * _UNITS[(m["unit"] or "").lower()]
    if not 1 <= total < 2**60:
        raise ToolkitError(f"--max-memory '{text}': '{size}' must be at least 1 byte and under 1 EiB")
    return int(total)


def __getattr__(name: str):
    """The image-only processor classes by name (``ImageOnly...Processor``), as their adapters declare them."""
    for cls in IMAGE_ONLY_PROCESSORS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_processor(resolved: str, config, local_only: bool):
    """The checkpoint's processor; without torchvision, the image-only one its adapter declares
    (`IMAGE_ONLY_PROCESSORS`: a family whose processor needs a video processor, which images never use)."""
    try:
        return AutoProcessor.from_pretrained(resolved, local_files_only=local_only)
    except (OSError, ValueError, ImportError):
        image_only = IMAGE_ONLY_PROCESSORS.get(getattr(config, "model_type", None))
        if image_only is None or importlib.util.find_spec("torchvision"):
            raise
    return image_only.from_pretrained(resolved, local_files_only=local_only)


SMALL_HIDDEN = 512  # below this, a CPU matmul is too small to gain from intra-op threads


def default_threads(model) -> int | None:
    """1 for a small model on CPU (hidden size <= `SMALL_HIDDEN`), else None (keep torch's setting)."""
    small = model.config.text_config.hidden_size <= SMALL_HIDDEN
    return 1 if small and next(model.parameters()).device.type == "cpu" else None


@contextlib.contextmanager
def cpu_threads(model, threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads while running `model`, then restore them.

    `threads` None means: one thread for a small model (hidden size <= `SMALL_HIDDEN`) on CPU, else leave
    torch's setting. Matmuls of a tiny model gain nothing from threads, and on a shared machine threads that
    spin-wait for a busy core made the embedded model's probe over 10x slower.
    """
    threads = default_threads(model) if threads is None else threads
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

