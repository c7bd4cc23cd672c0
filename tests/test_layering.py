"""Only ``saturation/core/adapters/`` knows model families and HF internals: no other module names a module path of
the model, imports a ``modeling_*`` module of a model family, reads a private config field (issue 11), or names a
family beyond LLaVA-1.5 (its aliases, presets, model types, processor classes, tokens) in code."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ROOT / "saturation" / "core" / "adapters"
FORBIDDEN = re.compile(
    r"\b(language_model|self_attn|q_proj|k_proj|v_proj|o_proj|vision_tower|multi_modal_projector|input_layernorm"
    r"|image_newline|get_placeholder_mask|get_image_features)\b"  # module paths and merge internals
    r"|transformers\.models\.\w+\.modeling_\w+|from \.+modeling_\w+ import"  # a family's modeling module
    r"|\._attn_implementation|[\"']_attn_implementation[\"']|config\._\w+|[\"']_name_or_path[\"']"  # private fields
)
# A family in code: an identifier or a string literal naming one (its model type, classes, aliases, presets, hub
# ids, chat tokens' owners). Plain LLaVA is not here: LLaVA-1.5 is the contract's default and the toolkit's lineage
# (the embedded tiny LLaVA, LLaVA JSON, `RoutedLlava`), named throughout; the families beyond it stay in the adapters.
FAMILY = re.compile(r"llava[_-]?next|onevision|qwen|gemma|mistral|siglip|vicuna", re.IGNORECASE)
# A path into an HF model in a string literal (``getattr``/``get_submodule`` by name). `embed_tokens`, `lm_head` and
# `rotary_emb` alone are also the adapter's own attribute names: only their dotted form is a path.
HF_PATH = re.compile(
    r"\b(language_model|self_attn|[qkvo]_proj|input_layernorm|multi_modal_projector|vision_tower|modeling_\w+)\b"
    r"|\.visual\b|\bvisual\.|\bmerger\.|\.merger\b|(\.|\b)(embed_tokens|lm_head|rotary_emb)\.|\.(embed_tokens|lm_head|rotary_emb)\b")


def library_files(root: Path = ROOT) -> list[Path]:
    """Every .py of the project outside tests/ and the adapters package (no virtual environments, no builds)."""
    skip = {"tests", "build", "dist", "__pycache__", "data_samples"}
    adapters = root / "saturation" / "core" / "adapters"
    return [p for p in root.rglob("*.py")
            if not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                       for part in p.relative_to(root).parts)
            and adapters not in p.parents]


def prose(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the prose string literals lie, (start, end) as (line, column): docstrings and other bare string
    statements, and ``help=`` texts (a CLI option's description for the user), implicitly joined parts included.
    Family names there are documentation, not knowledge in code."""
    nodes = [node.value for node in ast.walk(tree)
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    nodes += [node.value for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "help"]
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in nodes]


def family_leaks(source: str) -> list[tuple[int, str]]:
    """(line, token) of every identifier or non-prose string literal of `source` that names a family beyond
    LLaVA-1.5, and of every non-prose string literal that holds an HF module path. Comments are skipped."""
    spans = prose(ast.parse(source))
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string
        if tok.type == tokenize.NAME and FAMILY.search(text):
            hits.append((tok.start[0], text))
        elif tok.type == tokenize.STRING and not any(a <= tok.start < b for a, b in spans) and (
                FAMILY.search(text) or HF_PATH.search(text)):
            hits.append((tok.start[0], text))
    return hits


def test_only_the_backbones_know_hf_internals():
    files = library_files()
    assert any(p.name == "model.py" and p.parent.name == "routing" for p in files)  # the walk found the library
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in files for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, "HF internals outside saturation/core/adapters/:\n" + "\n".join(hits)


def test_only_the_adapters_know_the_families():
    """A new family is one module in saturation/core/adapters/: no alias table, preset, processor class, model type
    string or module path of a family anywhere else (code only: comments, docstrings and help texts are prose)."""
    files = library_files()
    assert any(p.name == "geometry.py" for p in files) and any(p.name == "loading.py" for p in files)
    hits = [f"{p.relative_to(ROOT)}:{n}: {text[:100]}"
            for p in files for n, text in family_leaks(p.read_text(encoding="utf-8"))]
    assert not hits, "family knowledge outside saturation/core/adapters/:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_must():
    for leak in ("model.model.language_model.norm(h)", "layer.self_attn.k_proj(x)",
                 "from transformers.models.llama.modeling_llama import apply_rotary_pos_emb",
                 "cfg.text_config._attn_implementation", 'getattr(c, "_attn_implementation")',
                 "model.model.multi_modal_projector.linear_1"):
        assert FORBIDDEN.search(leak), leak
    for fine in ("from transformers.modeling_outputs import CausalLMOutputWithPast", "a.attn_implementation",
                 "adapter_for(model).text_model.train()", "a.key_values(i, side, rope)"):
        assert not FORBIDDEN.search(fine), fine


def test_the_family_scan_reads_code_not_prose():
    leaks = ['if config.model_type == "gemma3":\n    pass\n', "from transformers import Qwen2_5_VLProcessor\n",
             'ALIASES = {"qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}\n', "x = _llava_next_7b()\n",
             'm = model.get_submodule("model.visual.merger")\n', 'h = getattr(model, "lm_head.weight")\n',
             'f"{a}.embed_tokens"\n']
    for leak in leaks:
        assert family_leaks(leak), leak
    fine = ['"""Gemma 3 and Qwen2.5-VL: prose in a docstring."""\n', "x = 1  # Qwen's mm_token_type_ids\n",
            'opt = Option(help="an alias (qwen2.5-vl-7b, "\n "gemma-3-4b)")\n', "h = a.lm_head(a.embed_tokens(ids))\n",
            'getattr(a, "rotary_emb")\n', 'load_llava = load_model\nname = "llava"\n']
    for ok in fine:
        assert not family_leaks(ok), ok


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that `path` (module `name`) imports, at the top or inside a function."""
    import ast

    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level-1 folders
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return (found & modules) - {name}


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Every import circle among the modules of `package` under `root` (lazy imports inside functions count)."""
    paths = {}
    for p in (root / package).rglob("*.py"):
        parts = p.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: _imports(p, m, set(paths)) for m, p in paths.items()}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        state[m] = "done"
        stack.pop()

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


@pytest.mark.parametrize("package", ["routing", "saturation"])
def test_no_import_circle(package):
    assert import_cycles(ROOT, package) == []


def test_the_circle_finder_finds_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.a import g\n")  # lazy, as artifact <-> model was
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b", "pkg.a"]]
