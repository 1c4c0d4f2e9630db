"""Structural rules of the code base (issue 12), checked so that they keep holding:

- no import cycle among the modules of ``textrl``, ``textrl.agents`` and ``textrl.envs``;
- ``agents/`` and ``envs/`` import nothing distributed (``torch.distributed``, accelerate, DeepSpeed,
  ``textrl.parallel``): agents are plain torch, envs know nothing of processes;
- no function longer than 60 lines (its docstring excluded);
- ``experiments/`` and ``benchmarks/`` use no underscore-prefixed textrl names;
- the README's architecture table lists every module, and its picture of one update names the files the
  data passes through, in order.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"textrl": ROOT / "textrl", "textrl.agents": ROOT / "agents", "textrl.envs": ROOT / "envs"}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the three import packages (and textrl's subpackages)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports (at module level or inside functions; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found


def test_no_import_cycles():
    mods = modules()
    graph = {m: {i for i in imports(p, set(mods)) if i in mods and i != m} for m, p in mods.items()}
    cycles, state, stack = [], {}, []

    def visit(m):  # depth-first search: a back edge closes a cycle
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 40 and graph["textrl.loop"]  # the walk saw the code base


def test_agents_and_envs_import_nothing_distributed():
    mods = modules()
    banned = ("torch.distributed", "accelerate", "deepspeed", "textrl.parallel")
    bad = {m: sorted(i for i in imports(p, set(mods)) if i.startswith(banned))
           for m, p in mods.items() if m.startswith(("textrl.agents", "textrl.envs"))}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, bad
    assert any(i.startswith("textrl.parallel") for i in imports(mods["textrl.lm.run"], set(mods)))  # rule can fail


def function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines -= first.end_lineno - first.lineno + 1
            yield node.name, node.lineno, lines


def test_no_function_longer_than_60_lines():
    long = [f"{path.relative_to(ROOT)}:{line} {name}() is {n} lines" for path in modules().values()
            for name, line, n in function_lengths(path) if n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def private_textrl_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    textrl_names, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("textrl"):
            parts = node.module.split(".")
            found += [f"{node.module}" for p in parts if p.startswith("_") and p not in ("__init__", "__main__")]
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"{node.module}.{a.name}")
                textrl_names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            textrl_names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("textrl")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in textrl_names):
            found.append(f"{node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("folder", ["experiments", "benchmarks"])
def test_experiments_and_benchmarks_use_only_public_names(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    bad = {str(p.relative_to(ROOT)): private_textrl_uses(p) for p in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def readme() -> str:
    return (ROOT / "README.md").read_text()


def module_file(name: str) -> str:
    path = modules()[name].relative_to(ROOT)
    return str(path)


def test_readme_architecture_table_lists_every_module():
    text = readme()
    table = text[text.index("## Architecture"):]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = {f for cell in first_cells for f in re.findall(r"`([\w/.]+\.py)`", cell)}
    expected = {module_file(m) for m in modules() if not modules()[m].name.startswith("__")}
    assert not expected - listed, f"modules missing from the README's architecture table: {sorted(expected - listed)}"
    assert not listed - expected, f"the table lists files that do not exist: {sorted(listed - expected)}"


def test_readme_pictures_one_update_through_its_files_in_order():
    text = readme()
    start = text.index("### One update, as data flows")
    block = re.search(r"```\n(.*?)```", text[start:], re.S).group(1)
    assert len(block.splitlines()) <= 40  # one screen
    named = re.findall(r"[\w/]+\.py", block)
    assert named and all((ROOT / f).is_file() for f in named), [f for f in named if not (ROOT / f).is_file()]
    order = ["textrl/loop.py", "textrl/lm/run.py", "textrl/lm/collect.py", "envs/text_gen.py",
             "textrl/lm/generate.py", "envs/kl_penalty.py", "textrl/parallel/learner.py", "agents/ppo.py",
             "textrl/tracking.py", "textrl/checkpoint.py"]
    positions = [named.index(f) for f in order]
    assert positions == sorted(positions), [named[p] for p in positions]
