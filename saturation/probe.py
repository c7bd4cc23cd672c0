"""The saturation probe: three views of every decoder layer, reduced per sample while the model runs.

For each sample and each decoder layer ℓ (0-based; layer ℓ maps h_ℓ to h_ℓ+1, h_0 = the input embeddings):

- ``cosine``: cos(h_ℓ, h_ℓ+1) of the residual stream, averaged over image tokens and over text tokens;
- ``attention_mass``: for text queries after the image block, the attention probability on image keys
  (modality ``image``), on text keys (``text``) and on the first token (``bos``), each summed over its keys
  and averaged over heads and queries; ``attention_mass_max_head`` is the largest single head's image mass,
  and ``attention_mass_uniform`` what uniform attention would give (a reference, the same at every layer);
- ``logit_lens_kl``: KL(p_final ‖ p_ℓ) in nats with p_ℓ = softmax(lm_head(norm(h_ℓ+1))), the raw output of
  layer ℓ, averaged over image tokens and over text tokens. It is 0 at the last layer by definition.

"Text tokens" are the real non-image tokens except the first one (BOS: the attention sink, whose huge,
near-constant activation would swamp a mean); see `saturation.metrics.token_groups`.

What is fed in: each record's first turn with its answer, ``USER: <image>\\n{q} ASSISTANT: {a}</s>`` (teacher
forcing). The answer tokens are where a LLaVA model actually reads the image, so they belong among the text
queries; the prompt alone would leave a single position (after ``ASSISTANT:``) that predicts image content.
Later turns are left out so every sample weighs the same. Batches are right-padded with explicit position
ids; pads are in no token group, so a padded batch gives each sample the numbers it gets alone.

Memory: hooks on the anatomy's hook points (TransformerLens names) reduce the attention pattern and the
cosine inside the layer's forward. The logit lens cannot finish before p_final exists, so each layer keeps
only its output rows at image and text positions ([tokens, d_model], far smaller than [tokens, vocab]) until
the forward ends; the lens then runs in chunks of (layer, row) pairs in the compute dtype, never forming a
[layers, rows, vocab] tensor (`logit_lens_kl`). Nothing is kept across batches except a few numbers per
sample, which go to disk in parquet shards, so peak memory depends on the batch, never on n.

``lens_positions`` N (``--lens-positions``) runs the lens on a seeded sample of at most N positions per sample,
half image and half text (`metrics.lens_sample`; a modality short of its half passes the rest to the other),
drawn from ``--seed`` and the record id (`lens_seed`): the same positions whatever the batch, rank or resume.
The other views still read every position. The lens is lm_head once per layer and position (at 7B about 0.65
of the layer's own FLOPs), so this is what makes the probe cheap on long image blocks.

Files (`run_probe`): ``DIR/samples/`` (manifest.json + shard-NNNNN.parquet, one per batch: an interrupted run
resumes there; a different model, seed, data file, dtype or lens_positions is refused), ``per_sample.parquet``
(sample, sample_id, layer, modality, metric, value), ``summary.csv`` (layer, modality, metric, median, q25, q75) and
``recommendation.json`` (`saturation.recommend`). Figure 2 is drawn from these by ``figures.figure2``.

``backend="transformer-lens"`` feeds the same reductions from a TransformerBridge's hook points instead
(extra ``lens``); the two agree to ~1e-7 on the tiny models.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saturation.core import distributed as dist
from saturation.core.adapters import Adapter, adapter_class, adapter_for
from saturation.core.data import (
    PromptFormat,
    Record,
    collate,
    encode_record,
    image_inputs,
    to_model,
)
from saturation.core.errors import ToolkitError
from saturation.core.files import atomic_write, disk_guard, ensure_output_dir, file_digest, write_json
from saturation.core.lengths import check_prompts, max_positions
from saturation.core.loading import (
    DATA_SAMPLES,
    cpu_threads,
    load_config,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_name,
)
from saturation.core.runs import locked
from saturation.core.sources import DataSpec, Source, announce, open_source, synthetic_data_warning

from . import metrics

DEFAULT_DATA = DATA_SAMPLES / "shapes" / "probe.json"
DEFAULT_N = 64
BACKENDS = ("hf", "transformer-lens")

# (metric, modality) pairs of the per-sample table, in the order they are written.
KEYS: tuple[tuple[str, str], ...] = (
    ("cosine", "image"),
    ("cosine", "text"),
    ("attention_mass", "image"),
    ("attention_mass", "text"),
    ("attention_mass", "bos"),
    ("attention_mass_max_head", "image"),
    ("attention_mass_uniform", "image"),
    ("logit_lens_kl", "image"),
    ("logit_lens_kl", "text"),
)
TABLE_COLUMNS = ["sample", "sample_id", "layer", "modality", "metric", "value"]
SUMMARY_COLUMNS = ["layer", "modality", "metric", "median", "q25", "q75"]
LENS_CHUNK_ELEMENTS = 1 << 25  # rows x vocab per logit-lens chunk: 128 MB of fp32 logits
# What a finished run leaves in DIR (Figure 2 is drawn there by `figures.figure2`). A fresh start removes them
# first, so a run that then fails never leaves an old recommendation beside the new manifest.
RESULT_FILES = ("recommendation.json", "summary.csv", "per_sample.parquet", "figure2.png", "figure2.pdf")


# --- eager attention, local to the probe ---


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch the language model to eager attention (the only kind that returns weights), then restore it.

    The vision tower keeps its own implementation; only the decoder layers' patterns are read.
    """
    with adapter_for(model).use_attention("eager"):
        yield


# --- one batch: hooks that reduce as the layers run ---


class LayerReducer:
    """Forward hooks on ``blocks.{l}.hook_resid_post`` and ``blocks.{l}.attn.hook_pattern`` of an `Adapter`.

    Use as a context manager around any number of forwards; call `begin` before each forward and `finish`
    after it. Per-sample results are [batch, num_layers] fp32 tensors keyed by (metric, modality).
    The reductions themselves are `resid_post` and `pattern`, so another hook system (TransformerLens)
    can feed the very same code.
    """

    def __init__(self, anat: Adapter, lens_positions: int | None = None):
        self.anat = anat
        self.num_layers = anat.num_layers
        self.lens_positions = lens_positions  # None: the lens at every image and text position
        self._handles: list = []
        self._groups: dict[str, Tensor] | None = None

    def __enter__(self) -> LayerReducer:
        points = self.anat.hook_points()
        for layer in range(self.num_layers):
            resid = points[f"blocks.{layer}.hook_resid_post"]
            pattern = points[f"blocks.{layer}.attn.hook_pattern"]
            self._handles.append(resid.register_forward_hook(self._resid_hook(layer), with_kwargs=True))
            self._handles.append(pattern.register_forward_hook(self._pattern_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._groups = self.hidden = None

    def begin(self, attention_mask: Tensor, image_mask: Tensor, lens_seeds: list[int] | None = None) -> None:
        """Set the token groups of the next forward ([batch, seq] masks) and clear the buffers.

        With `lens_positions`, `lens_seeds` (one per sample, `lens_seed`) draws the positions the logit lens reads.
        """
        g = metrics.token_groups(attention_mask, image_mask)
        self._groups = g
        self._lens_rows = g["image"] | g["text"]
        if self.lens_positions is not None:
            if lens_seeds is None or len(lens_seeds) != attention_mask.shape[0]:
                raise ValueError("a sampled logit lens needs one seed per sample (lens_seed)")
            self._lens_rows = metrics.lens_sample(g["image"], g["text"], self.lens_positions, lens_seeds)
        any_query = g["query"].any(0).nonzero()
        self._q0 = int(any_query[0]) if len(any_query) else 0  # queries never start earlier in any row
        batch = attention_mask.shape[0]
        self.values = {k: torch.full((batch, self.num_layers), math.nan, device=attention_mask.device) for k in KEYS}
        self.values["attention_mass_uniform", "image"][:] = metrics.uniform_mass(g["query"], g["image"], attention_mask)[:, None]
        self.hidden: list[Tensor | None] = [None] * self.num_layers

    def resid_post(self, layer: int, h_in: Tensor, h_out: Tensor) -> None:
        """Layer `layer` mapped `h_in` to `h_out` ([batch, seq, d_model]): cosine now, lens rows for later."""
        g = self._groups
        cos = metrics.adjacent_cosine(h_in, h_out, {"image": g["image"], "text": g["text"]})
        for modality, v in cos.items():
            self.values["cosine", modality][:, layer] = v
        if layer < self.num_layers - 1:  # the last layer's lens is the model's own output: KL 0, never kept
            self.hidden[layer] = h_out[self._lens_rows]  # [rows, d_model]: what the logit lens will need

    def pattern(self, layer: int, weights: Tensor | None) -> None:
        """Layer `layer`'s attention pattern [batch, heads, q, k], reduced to a few numbers per sample."""
        if weights is None:
            raise ToolkitError("the attention module returned no weights: the probe needs eager attention")
        g, q0 = self._groups, self._q0
        mean, top = metrics.attention_mass(
            weights[:, :, q0:], g["query"][:, q0:], {"image": g["image"], "text": g["text"], "bos": g["bos"]}
        )
        for modality, v in mean.items():
            self.values["attention_mass", modality][:, layer] = v
        self.values["attention_mass_max_head", "image"][:, layer] = top["image"]

    def _resid_hook(self, layer: int) -> Callable:
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            self.resid_post(layer, h_in, output[0] if isinstance(output, tuple) else output)

        return hook

    def _pattern_hook(self, layer: int) -> Callable:
        def hook(module, args, output):
            self.pattern(layer, output[1] if isinstance(output, tuple) and len(output) > 1 else None)

        return hook

    def finish(self, logits: Tensor, unembed: Callable[[Tensor], Tensor] | None = None) -> dict[tuple[str, str], Tensor]:
        """Run the logit lens against `logits` [batch, seq, vocab] (the model's own output) and return all
        per-sample values, on CPU. Frees the kept layer outputs. `unembed` defaults to the anatomy's."""
        rows = self._lens_rows
        index = rows.flatten().nonzero().flatten().to(logits.device)  # lens rows of logits [batch*seq, vocab]
        kl = logit_lens_kl(unembed or self.anat.unembed, self.hidden, logits.reshape(-1, logits.shape[-1]), index)
        self.hidden = [None] * self.num_layers
        sample = rows.nonzero()[:, 0]
        is_image = self._groups["image"][rows]
        batch = rows.shape[0]
        for modality, keep in (("image", is_image), ("text", ~is_image)):
            for layer in range(self.num_layers):
                self.values["logit_lens_kl", modality][:, layer] = metrics.segment_mean(kl[layer][keep], sample[keep], batch)
        return {k: v.float().cpu() for k, v in self.values.items()}


def logit_lens_kl(unembed: Callable[[Tensor], Tensor], hidden: list[Tensor | None], final_logits: Tensor,
                  index: Tensor | None = None) -> Tensor:
    """KL(p_final ‖ softmax(unembed(h_ℓ))) per layer and row, in nats. hidden: L x [rows, d]; -> [L, rows] fp32.

    `final_logits` [rows, vocab] (or [N, vocab] with `index` [rows] picking the rows) must be the model's output
    ``unembed(h_L)``, so the last layer's KL is 0 by definition: ``hidden[-1]`` is never read (it may be None).
    The lens runs in the compute dtype in chunks of (layer, row) pairs: a chunk's lens logits [rows, layers, vocab]
    hold at most `LENS_CHUNK_ELEMENTS` (several layers at once when the batch has few rows, so small models make
    few large matmuls), and its log-softmax is streamed (`metrics.kl_against_logits_`). Peak memory is about two
    chunks (the lens logits and p_final in fp32), whatever the number of rows or layers.
    """
    rows = len(index) if index is not None else final_logits.shape[0]
    layers, vocab = len(hidden) - 1, final_logits.shape[-1]  # the last layer is not computed
    out = torch.zeros(len(hidden), rows, device=final_logits.device)
    if rows == 0 or layers == 0:
        return out
    budget = max(1, LENS_CHUNK_ELEMENTS // vocab)  # (layer, row) pairs per chunk
    step = min(rows, budget)
    group = max(1, budget // step)  # layers per chunk
    for start in range(0, rows, step):
        sl = slice(start, start + step)
        final = final_logits[index[sl]] if index is not None else final_logits[sl].clone()  # a copy, used up below
        p, neg_entropy = metrics.final_distribution_(final)
        del final
        for first in range(0, layers, group):
            span = range(first, min(first + group, layers))
            # [rows, k, vocab] in the compute dtype; a device map may have left the layers on several devices
            z = unembed(torch.stack([hidden[layer][sl].to(final_logits.device) for layer in span], 1))
            out[first:span.stop, sl] = metrics.kl_against_logits_(p, neg_entropy, z).T
            del z
        del p  # before the next chunk's p_final exists
    return out.clamp_(min=0.0)  # KL >= 0; rounding can leave -1e-7


def encode_batch(records: list[Record], processor, image_token_id: int, fmt: PromptFormat | None = None,
                 limit: int | None = None) -> dict[str, Tensor]:
    """Right-padded batch of each record's first turn with its answer (see the module docstring), in the family's
    prompt format `fmt` (default LLaVA-1.5's), with its image inputs (LLaVA-NeXT: tiles padded, ``image_sizes``).
    A record longer than `limit` positions (the model's) is refused, naming it (`saturation.core.lengths`)."""
    examples = [encode_record(replace(r, turns=r.turns[:1]), processor, fmt=fmt) for r in records]
    check_prompts([len(e["input_ids"]) for e in examples], [r.id for r in records], limit)
    pad = processor.tokenizer.pad_token_id
    return collate(examples, 0 if pad is None else pad, image_token_id, padding_side="right")


def lens_seed(seed: int, sample_id: str) -> int:
    """The seed of one sample's logit-lens positions: from ``--seed`` and the record id alone, so the draw is the
    same whatever batch or rank the sample lands in, and on a resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()[:8], "little") >> 1


@torch.inference_mode()
def probe_batch(anat: Adapter, reducer: LayerReducer, batch: dict[str, Tensor],
                timings: dict[str, float] | None = None, lens_seeds: list[int] | None = None
                ) -> dict[tuple[str, str], Tensor]:
    """All per-sample values of one batch: {(metric, modality): [batch, num_layers]} on CPU.

    `batch` holds input_ids, attention_mask and the image inputs (pixel_values and the family's image kwargs),
    on the model's device; image-token counts may differ per sample (anyres). `timings`, when given,
    accumulates seconds spent in the forward (with hooks) and in the logit lens. `lens_seeds` (`lens_seed`, one
    per sample) is needed when the reducer samples the lens positions.
    """
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    t0 = time.perf_counter()
    reducer.begin(batch["attention_mask"], batch["input_ids"] == anat.image_token_id, lens_seeds)
    # the walk's own positions: generate's convention, M-RoPE [3, B, T] where the family has it
    logits = anat.forward(batch["input_ids"], batch["attention_mask"], **image_inputs(batch))
    sync()
    t1 = time.perf_counter()
    values = reducer.finish(logits)
    t2 = time.perf_counter()
    if timings is not None:
        timings["forward"] = timings.get("forward", 0.0) + t1 - t0
        timings["lens"] = timings.get("lens", 0.0) + t2 - t1
    return values


def boot_bridge(model, processor):
    """Wrap `model` in a TransformerLens `TransformerBridge` (the optional ``lens`` extra).

    The bridge replaces the model's submodules in place and forces eager attention, so the model serves
    this probe only afterwards. TransformerLens pip-installs torchvision at run time when it cannot load a
    processor; that is switched off here, and the processor is read from the model's own folder or cache.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.sources.transformers import helpers as tl_helpers
    except ImportError:
        raise ToolkitError("the transformer-lens backend needs the 'lens' extra: pip install 'dpvr-toolkit[lens]'") from None
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    parameter = next(model.parameters())
    ensure = getattr(tl_helpers, "_ensure_torchvision", None)
    tl_helpers._ensure_torchvision = lambda: False  # never pip-install anything at run time
    try:
        return TransformerBridge.boot_transformers(str(getattr(model, "name_or_path", "") or "llava"), hf_model=model,
                                                   tokenizer=processor.tokenizer, device=parameter.device,
                                                   dtype=parameter.dtype)
    except ToolkitError:
        raise
    except Exception as err:  # the bridge's own failures, as one line
        raise ToolkitError(f"TransformerBridge could not wrap this model: {str(err).strip().splitlines()[0]}") from None
    finally:
        if ensure is not None:
            tl_helpers._ensure_torchvision = ensure


@torch.inference_mode()
def bridge_probe_batch(bridge, reducer: LayerReducer, batch: dict[str, Tensor], lens_seeds: list[int] | None = None
                       ) -> dict[tuple[str, str], Tensor]:
    """`probe_batch` through TransformerLens hook points: the same reductions (`reducer.resid_post`,
    `reducer.pattern`) fed by ``blocks.{l}.hook_resid_pre/hook_resid_post`` and ``blocks.{l}.attn.hook_pattern``."""
    reducer.begin(batch["attention_mask"], batch["input_ids"] == reducer.anat.image_token_id, lens_seeds)
    resid_pre: dict[int, Tensor] = {}
    hooks = []
    for layer in range(reducer.num_layers):
        hooks += [
            (f"blocks.{layer}.hook_resid_pre", lambda t, hook, layer=layer: resid_pre.__setitem__(layer, t)),
            (f"blocks.{layer}.hook_resid_post", lambda t, hook, layer=layer: reducer.resid_post(layer, resid_pre.pop(layer), t)),
            (f"blocks.{layer}.attn.hook_pattern", lambda t, hook, layer=layer: reducer.pattern(layer, t)),
        ]
    logits = bridge.run_with_hooks(batch["input_ids"], fwd_hooks=hooks, **image_inputs(batch),
                                   attention_mask=batch["attention_mask"])
    return reducer.finish(logits, lambda h: bridge.unembed(bridge.ln_final(h)))


def values_table(values: dict[tuple[str, str], Tensor], samples: list[int], ids: list[str]) -> pd.DataFrame:
    """Long per-sample table (`TABLE_COLUMNS`) from `probe_batch`'s output for the batch's samples."""
    keys = list(values)
    stacked = torch.stack([values[k] for k in keys]).double().numpy()  # [keys, batch, layers]
    n_keys, batch, layers = stacked.shape
    key_index = np.repeat(np.arange(n_keys), batch * layers)
    sample_index = np.tile(np.repeat(np.arange(batch), layers), n_keys)
    return pd.DataFrame({
        "sample": np.asarray(samples, dtype=np.int64)[sample_index],
        "sample_id": np.asarray(ids, dtype=object)[sample_index],
        "layer": np.tile(np.arange(layers, dtype=np.int64), n_keys * batch),
        "modality": np.asarray([k[1] for k in keys], dtype=object)[key_index],
        "metric": np.asarray([k[0] for k in keys], dtype=object)[key_index],
        "value": stacked.reshape(-1),
    })


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per-layer median and IQR across samples (`SUMMARY_COLUMNS`), NaNs skipped; sorted metric, modality, layer."""
    grouped = table.groupby(["metric", "modality", "layer"], sort=True, observed=True)["value"]
    out = pd.DataFrame({"median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75)})
    return out.reset_index()[SUMMARY_COLUMNS]


# --- shards on disk, so an interrupted run resumes ---


class ShardStore:
    """``DIR/samples/``: a manifest (what produced the shards) and ``shard-NNNNN.parquet`` files.

    Under a launcher each rank writes ``shard-r{rank}-NNNNN.parquet`` (`tag` ``r{rank}-``), numbering only its own
    files, so ranks never collide; every rank's shards count as done on a resume, whatever the world size.
    """

    def __init__(self, folder: Path, tag: str = ""):
        self.folder = folder
        self.manifest = folder / "manifest.json"
        self.tag = tag

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.parquet"))

    def open(self, fingerprint: dict, resume: bool) -> None:
        """Check that old shards came from the same run settings (or clear them when not resuming)."""
        if not resume:
            for p in self.shards():
                p.unlink()
            self.manifest.unlink(missing_ok=True)
        elif self.manifest.is_file():
            old = json.loads(self.manifest.read_text())
            changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
            if changed:
                what = ", ".join(f"{k} {old.get(k)!r} (now {fingerprint[k]!r})" for k in changed)
                raise ToolkitError(f"{self.folder.parent} holds probe shards from a different run: {what}; "
                                   f"pass --no-resume to start over there, or choose another --out")
        elif self.shards():
            raise ToolkitError(f"{self.folder} has shards but no manifest.json; pass --no-resume to start over")
        write_json(self.manifest, fingerprint)

    def done(self) -> set[int]:
        return {int(s) for p in self.shards() for s in pd.read_parquet(p, columns=["sample"])["sample"].unique()}

    def write(self, table: pd.DataFrame) -> Path:
        own = [p for p in self.shards() if re.fullmatch(rf"shard-{self.tag}\d+", p.stem)]
        index = int(own[-1].stem.rsplit("-", 1)[1]) + 1 if own else 0
        path = self.folder / f"shard-{self.tag}{index:05d}.parquet"
        atomic_write(path, lambda p: table.to_parquet(p, index=False))
        return path

    def read(self, samples: set[int]) -> pd.DataFrame:
        """All rows of `samples`, one copy each, in a fixed order (the summary does not depend on shard order)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if not self.shards():
            return pd.DataFrame(columns=TABLE_COLUMNS)
        table = pa.concat_tables([pq.read_table(p) for p in self.shards()])
        table = table.filter(pc.is_in(table["sample"], pa.array(sorted(samples), pa.int64())))
        df = table.to_pandas(strings_to_categorical=True)  # a few bytes per row, whatever n is
        for col in ("sample_id", "modality", "metric"):
            df[col] = df[col].cat.reorder_categories(sorted(df[col].cat.categories))
        df = df.drop_duplicates(["sample", "layer", "modality", "metric"])
        return df.sort_values(["sample", "metric", "modality", "layer"], ignore_index=True)[TABLE_COLUMNS]


# --- the whole run ---


@dataclass
class ProbeConfig:
    """Options of ``saturation probe``; `run_probe` executes them."""

    model: str = "tiny"  # 'tiny', an alias, a hub id or a local directory
    n: int | None = None  # samples to probe (None: DEFAULT_N, or every record if the data has fewer)
    data: Path | str | None = None  # LLaVA JSON, a dataset (file, folder, hub name) or lmms:TASK (default: the
    # embedded shapes probe samples); see saturation.core.sources
    image_folder: Path | None = None  # default: the JSON's folder
    data_split: str | None = None  # the dataset's split (--data-split; not the routing split)
    data_subset: str | None = None  # the dataset's config name
    image_column: str | None = None  # None: detected
    question_column: str | None = None
    answer_column: str | None = None
    out: Path | None = None  # default: runs/probe/<model name>
    batch_size: int = 8
    seed: int = 0  # chooses the samples
    dtype: str | None = None  # None: fp32 on CPU, the checkpoint's dtype on GPU
    device: str | None = None  # None: cuda if available
    rule: str = "auto"  # split rule, see saturation.recommend.RULES
    resume: bool = True  # reuse finished shards in `out`
    backend: str = "hf"  # 'hf' hooks, or 'transformer-lens' (extra `lens`)
    progress: bool = True
    threads: int | None = None  # CPU intra-op threads; None: 1 for small models on CPU (see cpu_threads)
    device_map: str | None = None  # 'auto' etc.: accelerate places the layers (GPUs, CPU, disk); not with --device
    max_memory: str | None = None  # with device_map: "0=20GiB,cpu=64GiB"
    lens_positions: int | None = None  # logit lens on a seeded sample of N positions per sample (None: all)


@dataclass
class ProbeResult:
    """Where the files are and the headline numbers."""

    out: Path
    table_path: Path
    summary_path: Path
    recommendation_path: Path
    recommendation: dict
    n: int
    probed: int  # samples probed in this run (the rest came from shards)
    seconds: float
    summary: pd.DataFrame = field(repr=False)


def display_name(model: str) -> str:
    """A short name for titles: the alias or hub id as given, a local directory's last part."""
    text = str(model).rstrip("/\\")
    return Path(text).name if Path(text).is_dir() else text


def default_out(model: str) -> Path:
    name = display_name(model) or "model"
    return Path("runs") / "probe" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def summary_lines(result: ProbeResult, figures: list[Path] = ()) -> list[str]:
    """The one-screen summary printed at the end of ``saturation probe``."""
    rec, ev = result.recommendation, result.recommendation["evidence"]
    t, alt = ev["transition"], ev["alternatives"]
    lines = [
        f"saturation probe: {rec.get('display_name', rec['model'])}, {rec['num_layers']} layers, n={result.n} "
        f"({result.probed} probed now, {result.n - result.probed} from shards, {result.seconds:.1f} s)",
        f"  recommended split  s = {rec['split']}   (rule '{rec['rule']}')",
        f"    {ev['rule_definition']}",
        f"    decided by: {ev.get('decided_by', '-')}",
        f"  logit-lens 50% transition  image L{t['image']}, text L{t['text']}"
        + (f"  (lens on {rec['lens_positions']} sampled positions per sample)" if rec.get("lens_positions") else ""),
        f"  text->image attention  plateau L{ev['attention_plateau_layer']}; "
        f"cross-check: {'agrees' if ev['cross_check']['agrees'] else 'DISAGREES'} ({ev['cross_check']['text']})",
        "  other rules  " + ", ".join(f"{k} {v}" for k, v in alt.items()),
    ]
    if ev.get("disagreement"):  # rules far apart: say so plainly, with the conservative choice
        lines.append(f"  WARNING: {ev['disagreement']['text']}")
    if ev.get("min_split"):  # a rule's split fell inside layers the backbone needs shallow (DeepStack)
        lines.append(f"  note: {ev['min_split']['text']}")
    if "caveat" in ev:
        lines.append(f"  note: {ev['caveat']}")
    lines += [f"  files in {result.out}:",
              f"    {result.table_path.name} (per sample), {result.summary_path.name}, {result.recommendation_path.name}"]
    if figures:
        lines.append("    " + ", ".join(Path(f).name for f in figures))
    return lines


def data_fingerprint(source: Source) -> dict:
    """What the manifest records of the data: LLaVA JSON as before (path and file digest, so old shards still
    resume); any other source also its kind, split, subset, columns (the sample keys are its rows, chosen by the
    seed, which the manifest holds too)."""
    if source.kind == "llava-json":
        path = Path(source.label)
        return {"data": str(path.resolve()), "data_sha256": file_digest(path)}
    return {"data": source.label, "data_sha256": source.fingerprint, "data_source": source.identity()}


def _check_options(cfg: ProbeConfig) -> None:
    from .recommend import RULES

    if cfg.batch_size < 1:
        raise ToolkitError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if cfg.lens_positions is not None and cfg.lens_positions < 2:
        raise ToolkitError(f"--lens-positions must be at least 2, one image and one text position "
                           f"(got {cfg.lens_positions})")
    if cfg.device_map is not None or cfg.max_memory is not None:  # before any file is written
        from saturation.core.loading import check_placement

        check_placement(cfg.device, cfg.device_map, cfg.max_memory)
    if cfg.rule not in RULES:
        raise ToolkitError(f"unknown rule '{cfg.rule}': use one of {', '.join(RULES)}")
    if cfg.backend not in BACKENDS:
        raise ToolkitError(f"unknown backend '{cfg.backend}': use one of {', '.join(BACKENDS)}")
    if cfg.backend == "transformer-lens" and importlib.util.find_spec("transformer_lens") is None:
        raise ToolkitError("the transformer-lens backend needs the 'lens' extra: pip install 'dpvr-toolkit[lens]'")


def data_spec(cfg: ProbeConfig) -> DataSpec:
    """`cfg`'s data options as one `DataSpec` (the embedded shapes probe samples without --data); a `DataSpec`
    given as `cfg.data` is taken as it is."""
    if isinstance(cfg.data, DataSpec):
        return cfg.data
    return DataSpec(str(cfg.data if cfg.data is not None else DEFAULT_DATA), cfg.data_split, cfg.data_subset,
                    cfg.image_column, cfg.question_column, cfg.answer_column, cfg.image_folder)


def plan_samples(cfg: ProbeConfig) -> tuple[Source, list[Record], list[int]]:
    """The opened source, the chosen records and their rows in it (the table's `sample` key)."""
    source = open_source(data_spec(cfg))
    n = cfg.n if cfg.n is not None or source.num_rows is None else min(DEFAULT_N, source.num_rows)
    chosen, rows = source.select(n, cfg.seed)
    for r in chosen:  # several images are fine: every image position is an image token of the metrics
        if not r.images:
            raise ToolkitError(f"record {r.id}: no image; the probe compares image with text tokens, so a text-only "
                               f"record has nothing to measure (leave it out of --data)")
    if source.kind != "llava-json":
        announce(source.describe(len(chosen)))
    return source, chosen, rows



def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    speed = TextColumn("{task.fields[rate]}")
    return Progress(TextColumn("[bold]probe"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"), speed,
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def run_probe(cfg: ProbeConfig, *, model=None, processor=None) -> ProbeResult:
    """Probe `cfg.n` samples, write shards, the per-sample table, ``summary.csv`` and ``recommendation.json``.

    A loaded (`model`, `processor`) may be passed instead of loading ``cfg.model`` (its attention is switched
    to eager for the run and restored after). Figure 2 is drawn by the caller (``figures.figure2``), since
    ``saturation`` does not import ``figures``.

    Under ``torchrun``/``accelerate launch`` (`saturation.core.distributed`) every rank probes its share of the samples
    not yet in shards (``todo[rank::world]``) into its own shard files; rank 0 waits for all, then alone merges
    and writes the results. Every rank returns the same result; a failure on any rank stops all of them.
    """
    given = model is not None
    if not given and dist.world_size() > 1:
        cfg = replace(cfg, device=dist.rank_device(cfg.device))
    dist.init(cfg.device)
    with contextlib.ExitStack() as held:
        def claim() -> Path:  # every rank checks; rank 0 locks the folder for the run (one process per folder)
            _check_options(cfg)
            out = ensure_output_dir(cfg.out if cfg.out is not None else default_out(cfg.model))
            if dist.is_main():
                held.enter_context(locked(out))
            return out

        out = dist.together(claim)
        with disk_guard(out):
            return _run_probe(cfg, model, processor)


def _run_probe(cfg: ProbeConfig, model, processor) -> ProbeResult:
    """`run_probe` in its locked run folder."""
    given = model is not None
    model_name, fingerprint, samples, records, out, store = dist.together(lambda: _prepare(cfg, model))

    started = time.perf_counter()
    done = store.done()  # after rank 0 opened the store (`together` is a barrier): a --no-resume has cleared it
    todo = [(s, r) for s, r in zip(samples, records) if s not in done][dist.rank()::dist.world_size()]

    def probe_mine() -> None:
        nonlocal model, processor
        if todo:
            if model is None:
                model, processor = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                              device_map=cfg.device_map, max_memory=cfg.max_memory)
            _probe_into(store, model, processor, todo, cfg)

    dist.together(probe_mine)  # the barrier before the merge: every rank's shards are on disk, or all ranks stop
    seconds = max(dist.gather(time.perf_counter() - started))
    probed = sum(dist.gather(len(todo)))
    paths = out / "per_sample.parquet", out / "summary.csv", out / "recommendation.json"
    shown = display_name(model_name if given else cfg.model)
    if dist.is_main():
        config = model.config if model is not None else load_config(cfg.model)  # no model loaded: all from shards
        min_split = adapter_class(config).first_split(config)  # Qwen3-VL: after its DeepStack layers
        rec, summary = dist.together(lambda: _write_results(cfg, store, samples, model_name, shown,
                                                            fingerprint["num_layers"], paths, min_split))
    else:
        dist.together(lambda: None)  # rank 0 writes; then the files are there to read
        rec, summary = json.loads(paths[2].read_text()), pd.read_csv(paths[1])
    return ProbeResult(out, *paths, rec, len(samples), probed, seconds, summary)


def _prepare(cfg: ProbeConfig, model) -> tuple[str, dict, list[int], list[Record], Path, ShardStore]:
    """Every check before any work, the chosen samples and the shard store (rank 0 opens it: clears or checks)."""
    _check_options(cfg)
    if cfg.device_map is not None and dist.world_size() > 1:
        raise ToolkitError("--device-map under torchrun is not supported: data parallelism gives each rank one "
                           "device; use one of them (several processes, or one process with --device-map)")
    out = ensure_output_dir(cfg.out if cfg.out is not None else default_out(cfg.model))  # checks, creates nothing
    given = model is not None
    device = next(model.parameters()).device if given else resolve_device(None if cfg.device_map else cfg.device)
    dtype = next(model.parameters()).dtype if given else resolve_dtype(cfg.dtype, device)
    if not given:
        config = load_config(cfg.model)  # fail fast (offline, not LLaVA) before reading the data
        model_name = resolve_name(cfg.model)
    else:
        config = model.config
        model_name = str(getattr(model, "name_or_path", "") or cfg.model)
    source, records, samples = plan_samples(cfg)
    warning = synthetic_data_warning(cfg.model if not given else model_name, cfg.data)
    if warning and dist.is_main():  # after the data is read: a bad input stays one line
        announce(warning)
    store = ShardStore(out / "samples", tag=f"r{dist.rank()}-" if dist.world_size() > 1 else "")
    fingerprint = {"model": model_name, "seed": cfg.seed, **data_fingerprint(source),
                   "dtype": str(dtype), "num_layers": int(config.text_config.num_hidden_layers),
                   "lens_positions": cfg.lens_positions}  # a sampled lens changes the KL values: defining
    if dist.is_main():
        # A fresh start (store.open will not refuse it): old results would describe another run, so they go first.
        # So do results of another --n or --rule (the shards are reused): a run killed before it writes its own
        # must not leave them looking like its results.
        stale = not cfg.resume or not (store.manifest.is_file() or store.shards()) or _other_results(out, cfg, samples)
        store.open(fingerprint, cfg.resume)  # refuses other shards' options: their results stay with them
        if stale:
            for name in RESULT_FILES:
                (out / name).unlink(missing_ok=True)
    return model_name, fingerprint, samples, records, out, store


def _other_results(out: Path, cfg: ProbeConfig, samples: list[int]) -> bool:
    """Whether `out` holds results made with another sample count, rule or lens sampling than this run's."""
    try:
        rec = json.loads((out / "recommendation.json").read_text(encoding="utf-8"))
        made = (rec["evidence"].get("n"), rec["rule"], rec.get("lens_positions"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # none, or unreadable: whatever else is there is not known to be this run's
    return made != (len(samples), cfg.rule, cfg.lens_positions)


def _write_results(cfg: ProbeConfig, store: ShardStore, samples: list[int], model_name: str, shown: str,
                   num_layers: int, paths: tuple[Path, Path, Path], min_split: int = 1) -> tuple[dict, pd.DataFrame]:
    """Merge every shard of `samples` into the per-sample table, ``summary.csv`` and ``recommendation.json``."""
    from .recommend import recommend

    table_path, summary_path, rec_path = paths
    table = store.read(set(samples))
    atomic_write(table_path, lambda p: table.to_parquet(p, index=False))
    summary = summarize(table)
    atomic_write(summary_path, lambda p: summary.to_csv(p, index=False))
    rec = recommend(summary, model=model_name, num_layers=num_layers, rule=cfg.rule, n=len(samples), per_sample=table,
                    min_split=min_split)
    rec["display_name"] = shown
    rec["lens_positions"] = cfg.lens_positions  # None: the logit lens read every image and text position
    caveat = _training_caveat(model_name)
    if caveat:
        rec["evidence"]["caveat"] = caveat
    write_json(rec_path, rec)
    return rec, summary


def _training_caveat(model_name: str) -> str | None:
    """The caveat of a model trained with an auxiliary logit-lens loss on its image tokens: the embedded default
    `tiny` or any model of its recipe, whose folder's recipe.json records ``aux_weight > 0`` (``python -m
    saturation.shapes train`` writes it). `tiny-clean` (aux_weight 0) and `tiny-staged` (answer losses only) get
    none, nor does any model without such a file."""
    try:
        weight = json.loads((Path(model_name) / "recipe.json").read_text()).get("aux_weight", 0)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(weight, int | float) or weight <= 0:
        return None
    return ("this model was trained with an auxiliary logit-lens loss on image tokens at the LM input (recipe.json: "
            "aux_weight > 0, the tiny recipe), which shapes what the logit-lens view sees there")


def _probe_into(store: ShardStore, model, processor, todo: list[tuple[int, Record]], cfg: ProbeConfig) -> None:
    """Probe `todo` batch by batch, writing one shard per batch."""
    anat = adapter_for(model)
    device = next(model.parameters()).device
    if device.type == "meta":  # offloaded by a device map: accelerate's hooks bring inputs and weights per layer
        device = torch.device("cpu")
    dtype = next(model.parameters()).dtype
    reducer = LayerReducer(anat, cfg.lens_positions)
    fmt = PromptFormat.of(anat)
    bridge = boot_bridge(model, processor) if cfg.backend == "transformer-lens" else None
    hooks = contextlib.nullcontext(reducer) if bridge is not None else reducer  # the bridge has its own hooks
    with eager_attention(model), cpu_threads(model, cfg.threads), hooks, _progress(cfg.progress and dist.is_main()) as bar:
        task = bar.add_task("probe", total=len(todo), rate="")
        t0 = time.perf_counter()
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            batch = to_model(encode_batch([r for _, r in chunk], processor, anat.image_token_id, fmt,
                                          max_positions(model)), device, dtype)
            seeds = [lens_seed(cfg.seed, r.id) for _, r in chunk]
            if bridge is not None:
                values = bridge_probe_batch(bridge, reducer, batch, seeds)
            else:
                values = probe_batch(anat, reducer, batch, lens_seeds=seeds)
            store.write(values_table(values, [s for s, _ in chunk], [r.id for _, r in chunk]))
            done = start + len(chunk)
            bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):.1f} samples/s")
