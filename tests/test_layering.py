"""Only ``saturation/backbones/`` knows HF internals: no other module names a module path of the model, imports a
``modeling_*`` module of a model family, or reads a private config field (issue 11)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ROOT / "saturation" / "core" / "adapters"
FORBIDDEN = re.compile(
    r"\b(language_model|self_attn|q_proj|k_proj|v_proj|o_proj|vision_tower|multi_modal_projector|input_layernorm"
    r"|image_newline|get_placeholder_mask|get_image_features)\b"  # module paths and merge internals
    r"|transformers\.models\.\w+\.modeling_\w+|from \.+modeling_\w+ import"  # a family's modeling module
    r"|\._attn_implementation|[\"']_attn_implementation[\"']|config\._\w+|[\"']_name_or_path[\"']"  # private fields
)


def library_files() -> list[Path]:
    """Every .py of the project outside tests/ and the backbones package (no virtual environments, no builds)."""
    skip = {"tests", "build", "dist", "__pycache__", "data_samples"}
    return [p for p in ROOT.rglob("*.py")
            if not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                       for part in p.relative_to(ROOT).parts)
            and BACKBONES not in p.parents]


def test_only_the_backbones_know_hf_internals():
    files = library_files()
    assert any(p.name == "model.py" and p.parent.name == "routing" for p in files)  # the walk found the library
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in files for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, "HF internals outside saturation/backbones/:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_must():
    for leak in ("model.model.language_model.norm(h)", "layer.self_attn.k_proj(x)",
                 "from transformers.models.llama.modeling_llama import apply_rotary_pos_emb",
                 "cfg.text_config._attn_implementation", 'getattr(c, "_attn_implementation")',
                 "model.model.multi_modal_projector.linear_1"):
        assert FORBIDDEN.search(leak), leak
    for fine in ("from transformers.modeling_outputs import CausalLMOutputWithPast", "a.attn_implementation",
                 "adapter_for(model).text_model.train()", "a.key_values(i, side, rope)"):
        assert not FORBIDDEN.search(fine), fine


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


def test_no_import_circle_in_routing():
    assert import_cycles(ROOT, "routing") == []


def test_the_circle_finder_finds_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.a import g\n")  # lazy, as artifact <-> model was
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b", "pkg.a"]]
