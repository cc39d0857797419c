"""Dependencies point one way (README "Layout"): models and kernels at the bottom, the format
layer above models, the runtime and calibration above those, exporters above them, the
commands on top. Read from every import statement in the source, function-level ones too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> folder (pyproject.toml's package-dir mapping)
FOLDERS = {"polarc": ROOT / "polarc", "polarc.plugins": ROOT / "plugins",
           "polarc.calibration": ROOT / "calibration", "polarc.exporters": ROOT / "exporters",
           "polarc.benchmarks": ROOT / "benchmarks"}
BASE = {"polarc", "polarc.errors", "polarc.outputs", "polarc.console"}

# layer -> the layers it may import (besides itself and BASE)
ALLOWED = {
    "polarc.models": set(),
    "polarc.plugins": set(),
    "polarc.format": {"polarc.models"},
    "polarc.runtime": {"polarc.models", "polarc.plugins", "polarc.format"},
    "polarc.calibration": {"polarc.models", "polarc.format"},
    "polarc.exporters": {"polarc.models", "polarc.plugins", "polarc.format", "polarc.calibration"},
    "polarc.server": {"polarc.models", "polarc.format", "polarc.runtime"},
    "polarc.commands": {"polarc.models", "polarc.plugins", "polarc.format", "polarc.runtime",
                        "polarc.calibration", "polarc.exporters", "polarc.benchmarks",
                        "polarc.server"},
    "polarc.cli": {"polarc.commands"},
    "polarc.benchmarks": {"polarc.models", "polarc.plugins", "polarc.format", "polarc.runtime",
                          "polarc.calibration", "polarc.exporters"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "polarc" and parts and f"polarc.{parts[0]}" in FOLDERS:
                continue
            out[name] = path
    return out


def layer_of(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def imports(path: Path, module: str) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return {name for name in found if name == "polarc" or name.startswith("polarc.")}


def test_every_module_is_in_a_layer() -> None:
    unplaced = [m for m in modules() if layer_of(m) not in ALLOWED and m not in BASE]
    assert unplaced == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down(module: str) -> None:
    if module in BASE:
        allowed_layers = {"polarc.errors"}
    else:
        allowed_layers = ALLOWED[layer_of(module)] | {layer_of(module)}
    bad = sorted(name for name in imports(modules()[module], module)
                 if name not in BASE and layer_of(name) not in allowed_layers)
    assert bad == [], f"{module} imports {bad}"


def test_the_runtime_loads_no_training_code() -> None:
    """Loading an engine and generating imports nothing of calibration or the exporters."""
    import subprocess
    import sys

    code = ("import sys; import polarc.runtime.generate, polarc.runtime.torch_runtime, "
            "polarc.format.engine_file; "
            "print(sorted(m for m in sys.modules if m.startswith(('polarc.calibration', "
            "'polarc.exporters', 'triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
