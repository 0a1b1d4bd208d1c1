"""The package layering of ``service/`` holds, read from every import statement (lazy ones too).

receiver <- influence <- adaptation <- composition (server, config, cli, api); serving and monitoring
use the receiver only; ``service`` and ``client`` never import each other.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the service packages its modules may import
ALLOWED = {
    "receiver": {"receiver"},
    "serving": {"receiver", "serving"},
    "monitoring": {"receiver", "monitoring"},
    "influence": {"receiver", "influence"},
    "adaptation": {"receiver", "serving", "monitoring", "influence", "adaptation"},
}
COMPOSITION = {"server", "config", "cli", "api"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _package(module: str) -> str | None:
    """'service.receiver.model' -> 'receiver'; 'service.server' -> 'server'."""
    parts = module.split(".")
    return parts[1] if parts[0] == "service" and len(parts) > 1 else None


def test_lower_packages_never_import_higher_ones():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / "service" / package).rglob("*.py")):
            for module in _imports(path):
                imported = _package(module)
                if imported is not None and imported not in allowed:
                    violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not violations, "\n".join(violations)


def test_every_service_module_belongs_to_a_known_layer():
    top_level = {p.stem for p in (ROOT / "service").glob("*.py")} - {"__init__"}
    packages = {p.name for p in (ROOT / "service").iterdir() if (p / "__init__.py").exists()}
    assert top_level | packages <= set(ALLOWED) | COMPOSITION, (top_level | packages) - set(ALLOWED) - COMPOSITION


def test_service_and_client_never_import_each_other():
    for side, other in (("service", "client"), ("client", "service")):
        for path in sorted((ROOT / side).rglob("*.py")):
            assert not [m for m in _imports(path) if m.split(".")[0] == other], f"{path} imports {other}"
