"""The house's floors: entry scripts on top, the training and sampling machinery in the middle, the library
below; no import circles, no entry script importing another, hardware.py imported before torch."""
import ast
import glob
import os

from conftest import ROOT

LIBRARY = {"hardware", "utils", "modules", "diffusion", "config", "checkpoints"}
MIDDLE = {"train", "options", "sampling", "quality"}
ENTRY = {"ddpm", "ddpm_conditional", "sample", "evaluate", "bench", "bench_cpu", "bench_samplers", "bench_quality"}
API_REEXPORTS = {("ddpm", "diffusion"), ("ddpm_conditional", "diffusion")}  # `from ddpm import Diffusion`
API_ENTRIES = {e for e, _ in API_REEXPORTS}  # examples may import Diffusion from them, as the original's scripts


def project_imports(path):
    """The project modules a file imports, in order, at any depth (lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module.split(".")[0])
    return [n for n in names if n in LIBRARY | MIDDLE | ENTRY]


def test_every_python_file_has_a_floor():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert files == LIBRARY | MIDDLE | ENTRY, files ^ (LIBRARY | MIDDLE | ENTRY)


def test_imports_go_down_only_and_never_in_a_circle():
    graph = {m: set(project_imports(os.path.join(ROOT, m + ".py"))) for m in LIBRARY | MIDDLE | ENTRY}
    for m, deps in graph.items():
        allowed = LIBRARY if m in LIBRARY else LIBRARY | MIDDLE
        assert deps <= allowed | {d for (e, d) in API_REEXPORTS if e == m}, (m, deps - allowed)
    for example in glob.glob(os.path.join(ROOT, "examples", "*.py")):
        assert set(project_imports(example)) <= LIBRARY | API_ENTRIES, example

    def visit(m, stack):
        assert m not in stack, " -> ".join(stack + [m])
        for d in graph[m]:
            visit(d, stack + [m])

    for m in graph:
        visit(m, [])


def test_entry_scripts_import_hardware_before_torch():
    scripts = [os.path.join(ROOT, m + ".py") for m in ENTRY] + glob.glob(os.path.join(ROOT, "examples", "*.py"))
    for path in scripts:
        tree = ast.parse(open(path).read())
        lines = {}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                    lines.setdefault(name.split(".")[0], node.lineno)
        if os.path.basename(path)[:-3] in API_ENTRIES:  # first of all: examples import them in its place
            assert min(lines, key=lines.get) == "hardware", path
        heavy = [m for m in ("torch", "torchvision", "numpy") if m in lines]
        first = min((lines[m] for m in ("hardware", *API_ENTRIES) if m in lines), default=None)
        if heavy:  # (bench_cpu.py loads torch only in subprocesses, under the OpenMP settings it compares)
            assert first is not None and all(first < lines[m] for m in heavy), path
