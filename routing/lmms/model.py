"""The lmms-eval model class (imported by lmms-eval only; see `routing.lmms.plugin` for the logic).

Importing it also applies the work-around of `routing.lmms.compat` where the installed lmms-eval needs it (0.7.3:
every multiple-choice task failed), so nothing has to be put on ``PYTHONPATH``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import lmms_eval.api.instance
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from loguru import logger
from tqdm import tqdm

from routing.lmms.compat import patch_pair_unwrapping
from routing.lmms.plugin import (
    MODEL_ID,
    batch_size_of,
    flag_of,
    generate_requests,
    loaded_line,
    loglikelihood,
    loudly,
    model_args,
)
from saturation.core.loading import default_threads, load_model


def _lmms_version() -> str:
    try:
        return version("lmms_eval")
    except PackageNotFoundError:  # a source checkout on sys.path
        return "(version unknown)"


if patch_pair_unwrapping(lmms_eval.api.instance):
    logger.info(f"{MODEL_ID}: lmms-eval {_lmms_version()} turns loglikelihood pairs into text (every "
                "multiple-choice task would fail): passing them through (routing.lmms.compat)")
_loud = loudly(logger.error)  # our refusals stand out in lmms-eval's log, above its own traceback


class DPVRLlava(lmms):
    """A LLaVA checkpoint, routed when ``routing=DIR`` is given: ``--model_args pretrained=...,routing=...``.

    Accepted `--model_args` keys: `routing.lmms.plugin.MODEL_ARGS`; any other key is refused (one line).
    """

    is_simple = True

    @classmethod
    @_loud
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DPVRLlava:
        """lmms-eval's constructor path: `--model_args` plus its own --batch_size/--device, merged once."""
        return cls(**model_args(simple_parse_args_string(arg_string), additional_config or {}))

    @_loud
    def __init__(self, pretrained: str = "llava-1.5-7b", routing: str | None = None, dtype: str | None = None,
                 device: str | None = None, attn_implementation: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, compile: bool | str = False, **unknown) -> None:
        super().__init__()
        if unknown:  # direct construction with a bad key: the same one-line refusal
            model_args(unknown, {})
        self.batch_size_per_gpu = batch_size_of(batch_size, max_batch_size)
        compile = flag_of(compile, "compile")  # a bad value: one line before any weights load
        if str(batch_size).lower().startswith("auto"):
            logger.info(f"dpvr_llava: batch_size {batch_size} -> {self.batch_size_per_gpu} (no memory probing)")
        model, self.processor = load_model(str(pretrained), dtype=dtype, device=device,
                                           attn_implementation=attn_implementation)
        if threads := default_threads(model):  # as our CLI: one model per process, tiny matmuls gain nothing
            torch.set_num_threads(threads)
        if routing:
            from routing import load

            model = load(model, routing)
        if compile:  # compile=true: the layer groups under torch.compile (routing.compiled)
            from routing.compiled import compile_model

            compile_model(model)
        self.model = model.eval()
        self._rank, self._world_size = 0, 1
        logger.info(loaded_line(model, routing))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        return list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    @_loud
    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        with tqdm(total=len(args), desc=MODEL_ID, disable=self.rank != 0) as bar:
            return generate_requests(self.model, self.processor, [a[0] for a in args], [a[1] for a in args],
                                     lambda i: self._visuals(*args[i][2:6]), self.batch_size, bar.update)

    @_loud
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(negative log-likelihood, is_greedy) per request: the loss that lmms-eval's argmin expects."""
        out = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm((r.args for r in requests), total=len(requests),
                                                                         desc=MODEL_ID, disable=self.rank != 0):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            out.append(loglikelihood(self.model, self.processor, context, continuation,
                                     self._visuals(doc_to_visual, doc_id, task, split)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("dpvr_llava answers single-round requests only")

