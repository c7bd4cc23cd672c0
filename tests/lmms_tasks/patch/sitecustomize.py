"""Work-around for lmms-eval 0.7.3, loaded at interpreter start-up through PYTHONPATH (tests/test_lmms_cli.py).

lmms-eval 0.7.3's `lmms_eval.api.instance.unwrap_generation_output` turns every result that is not a string
into ``str(result)``, including loglikelihood's ``(nll, is_greedy)`` pairs, so every multiple-choice task then
fails in ``process_results`` (``zip(*results)`` over strings) for every model. This passes such a pair through
unchanged. Nothing else is touched; a version that handles the pair itself makes this a no-op.
Use it the same way for real runs: ``PYTHONPATH=tests/lmms_tasks/patch lmms-eval ...``.
"""

import importlib.abc
import importlib.machinery
import sys

TARGET = "lmms_eval.api.instance"


def _patch(module) -> None:
    original = module.unwrap_generation_output

    def unwrap_generation_output(output):
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], float | int) \
                and isinstance(output[1], bool):
            return output, None
        return original(output)

    module.unwrap_generation_output = unwrap_generation_output


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the module right after it executes, before `lmms_eval.evaluator` imports the function by name."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
