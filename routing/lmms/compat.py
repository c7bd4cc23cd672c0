"""lmms-eval version differences the plugin works around itself, only where the installed version needs it.

lmms-eval 0.7.3's `lmms_eval.api.instance.unwrap_generation_output` turns every result that is not a string into
``str(result)``, loglikelihood's ``(nll, is_greedy)`` pairs included, so every multiple-choice task then fails in
``process_results`` (``zip(*results)`` over strings, an opaque ``RetryError``) for every model, while lmms-eval
exits 0. The plugin passes such a pair through unchanged (`patch_pair_unwrapping`), and only when the installed
function does stringify a pair: a version that handles pairs itself is left alone. Plain functions of modules,
testable without lmms-eval.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from types import ModuleType

INSTANCE = "lmms_eval.api.instance"  # where lmms-eval defines the function (its evaluator imports it by name)


def stringifies_pairs(unwrap: Callable) -> bool:
    """Whether lmms-eval's `unwrap` turns a loglikelihood pair into text (the 0.7.3 bug)."""
    try:
        text, _ = unwrap((0.5, True))
    except Exception:  # noqa: BLE001 - an unwrap we cannot read is not one we patch
        return False
    return isinstance(text, str)


def is_pair(output) -> bool:
    """A loglikelihood result: ``(nll, is_greedy)``."""
    return isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], float | int) \
        and not isinstance(output[0], bool) and isinstance(output[1], bool)


def passing_pairs(original: Callable) -> Callable:
    """`original`, except that a loglikelihood pair comes back as itself (with no token counts)."""

    def unwrap_generation_output(output):
        return (output, None) if is_pair(output) else original(output)

    unwrap_generation_output.dpvr_original = original  # marks the patch: applied once
    return unwrap_generation_output


def patch_pair_unwrapping(instance: ModuleType, modules: Iterable[ModuleType] | None = None) -> bool:
    """Make `instance.unwrap_generation_output` pass loglikelihood pairs through, where it stringifies them, in
    `instance` and in every module of `modules` (default: all loaded ones) that imported it by name (lmms-eval's
    evaluator does, at import). Returns whether it patched; a fixed lmms-eval, or a second call, changes nothing."""
    original = getattr(instance, "unwrap_generation_output", None)
    if original is None or hasattr(original, "dpvr_original") or not stringifies_pairs(original):
        return False
    fixed = passing_pairs(original)
    for module in [instance, *(list(sys.modules.values()) if modules is None else modules)]:
        if getattr(module, "unwrap_generation_output", None) is original:
            module.unwrap_generation_output = fixed
    return True
