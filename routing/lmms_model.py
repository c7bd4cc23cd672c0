"""The lmms-eval model class (imported by lmms-eval only; see `routing.lmms_plugin` for the logic)."""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from saturation.loading import load_llava

from .lmms_plugin import generate_batch, loglikelihood


class DPVRLlava(lmms):
    """A LLaVA checkpoint, routed when ``routing=DIR`` is given: ``--model_args pretrained=...,routing=...``."""

    is_simple = True

    def __init__(self, pretrained: str = "llava-1.5-7b", routing: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, **kwargs) -> None:
        super().__init__()
        model, self.processor = load_llava(pretrained, dtype=dtype, device=device)
        if routing:
            from . import load

            model = load(model, routing)
        self.model = model.eval()
        self.batch_size_per_gpu = int(batch_size)
        self._rank, self._world_size = 0, 1

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

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        args = [r.args for r in requests]
        for start in tqdm(range(0, len(args), self.batch_size), desc="dpvr_llava", disable=self.rank != 0):
            chunk = args[start:start + self.batch_size]
            # a batch shares generation kwargs; lmms-eval sends one task's requests together
            for kwargs in {repr(a[1]): a[1] for a in chunk}.values():
                same = [a for a in chunk if a[1] == kwargs]
                answers += generate_batch(self.model, self.processor, [a[0] for a in same],
                                          [self._visuals(*a[2:6]) for a in same], dict(kwargs))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            out.append(loglikelihood(self.model, self.processor, context, continuation,
                                     self._visuals(doc_to_visual, doc_id, task, split)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("dpvr_llava answers single-round requests only")
