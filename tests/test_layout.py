"""The layout is the architecture: the import graph, read from the source, points the way the data flows.

Layers (folders of comal_openrlhf), each importing only the layers listed for it:

    core      the algorithm (losses, pairs, record, schedule, judging, matrix, game): numpy / torch only
    judges    the preference judges (models, servers, files) and the judge cache
    rollout   sampling from a policy (HF generate, vLLM engines)
    eval      exact game metrics, head-to-head win rates, reports
    training  the OpenRLHF side: trainer, iteration sources, data, log-prob paths
    cli       the commands, each parse -> build -> run

plus the foundation modules at the package root (errors, storage, rundir, weights, cpu_runtime, tiny). kernels/
knows nothing of either. No cycle between files; the package's own modules are imported at the top of a file except
where a comment says why (openrlhf.models, which the trainer imports, needs the CPU runtime first; the kernels, which
set TRITON_INTERPRET on import without a GPU, are loaded when a run asks for them).
"""

import ast
import os

from _util import REPO

PKG = os.path.join(REPO, "comal_openrlhf")
FOUNDATION = {"errors", "storage", "rundir", "weights", "cpu_runtime", "tiny", "_alias", "__init__"}
ALLOWED = {
    "core": {"errors", "core"},
    "judges": {"errors", "core", "judges", "storage", "cpu_runtime", "tiny"},
    "rollout": {"errors", "core", "rollout", "weights"},
    "eval": {"errors", "core", "judges", "rollout", "storage", "eval"},
    "training": {"errors", "core", "judges", "rollout", "eval", "storage", "weights", "training", "kernels", "rundir"},
    "cli": {"errors", "core", "judges", "rollout", "eval", "training", "storage", "rundir", "weights", "cpu_runtime"}
    | {"tiny", "cli", "kernels"},
    "errors": set(),
    "storage": {"errors"},
    "rundir": {"errors"},
    "weights": {"errors"},
    "cpu_runtime": {"errors"},
    "tiny": set(),
    "_alias": set(),
    "__init__": {"_alias"},
}
# (file, imported module) pairs allowed inside a function, each for the reason its comment in the code gives
LATE = {("cli/train_comal.py", "training/trainer.py")}  # openrlhf.models needs the CPU runtime first
CORE_FORBIDDEN = ("openrlhf", "deepspeed", "transformers", "argparse", "vllm", "ray")


def modules():
    """{relative path: [(imported module, at top level?)]} for every file of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, PKG)
            package = "comal_openrlhf." + ".".join(os.path.dirname(rel).split(os.sep)) if os.path.dirname(rel) else ""
            package = package or "comal_openrlhf"
            tree = ast.parse(open(path, encoding="utf-8").read())
            top = {id(n) for n in tree.body}
            found = []
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found += [(a.name, id(node) in top) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                    found += [(base, id(node) in top)]
                    found += [(f"{base}.{a.name}", id(node) in top) for a in node.names]
            out[rel] = found
    return out


def layer(rel):
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".py") else head


def own(module):
    """The package file a dotted name refers to (relative path), or None when it is no file of the package."""
    if not module.startswith("comal_openrlhf"):
        return None
    parts = module.split(".")[1:]
    for n in range(len(parts), -1, -1):
        base = os.path.join(PKG, *parts[:n])
        if os.path.isfile(base + ".py"):
            return os.path.relpath(base + ".py", PKG)
        if n and os.path.isfile(os.path.join(base, "__init__.py")):
            return os.path.relpath(os.path.join(base, "__init__.py"), PKG)
    return None


def test_layers_import_only_what_they_may():
    bad = []
    for rel, found in modules().items():
        for module, _ in found:
            target = own(module)
            if module.startswith("comal_openrlhf.kernels"):
                target = "kernels"
            if target is None or target == rel:
                continue
            if layer(target) not in ALLOWED[layer(rel)]:
                bad.append(f"{rel} imports {module} ({layer(rel)} -> {layer(target)})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycle_between_files():
    graph = {}
    for rel, found in modules().items():
        graph[rel] = {t for t in (own(m) for m, _ in found) if t and t != rel}
    # a package's __init__ is imported on the way to any of its files: an edge into a/b.py is an edge into a/__init__
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_core_knows_nothing_of_openrlhf_or_the_command_line():
    bad = [
        f"{rel}: {m}"
        for rel, found in modules().items()
        if layer(rel) == "core"
        for m, _ in found
        if m.split(".")[0] in CORE_FORBIDDEN
    ]
    assert not bad, bad


def test_kernels_know_nothing_of_the_package_or_openrlhf():
    bad = []
    for name in os.listdir(os.path.join(REPO, "kernels")):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(REPO, "kernels", name), encoding="utf-8").read())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                bad += [f"kernels/{name}: {m}" for m in names if m.split(".")[0] in ("comal_openrlhf", "openrlhf")]
    assert not bad, bad


def test_the_package_imports_its_own_modules_at_the_top():
    late = sorted(
        f"{rel}: {m}"
        for rel, found in modules().items()
        for m, at_top in found
        if not at_top and own(m) and (rel, own(m)) not in LATE
    )
    assert not late, "imports of the package inside functions:\n" + "\n".join(late)


def test_bitsandbytes_4bit_kernel_notice_is_filtered():
    """The one start-up notice of bitsandbytes on AVX-512 BF16 CPUs (noise a newcomer reads) is dropped,
    and only it: another record of the same logger still passes."""
    import logging

    import comal_openrlhf  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something else"]
