"""Repository rules that keep the extension installable and the engine Slicer-free."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedSAMAgent"


def test_every_module_file_is_listed_in_cmake():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s*([\w/${}.+-]+\.(?:py|json|png))\s*$", cmake, re.M))
    listed = {s.replace("${MODULE_NAME}", "MedSAMAgent") for s in listed}
    files = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
             if p.is_file() and p.suffix in (".py", ".json", ".png") and "__pycache__" not in p.parts}
    assert files - listed == set(), "not listed in MedSAMAgent/CMakeLists.txt"
    assert listed - files == set(), "listed in CMake but missing"


def test_engine_and_training_never_import_slicer_and_engine_never_imports_training():
    for folder in (MODULE / "MedSAMAgentLib", ROOT / "training"):
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    assert not name.split(".")[0] in ("slicer", "qt", "ctk", "vtk"), f"{path} imports {name}"
                    if folder.name == "MedSAMAgentLib":
                        assert not name.startswith("medsam_training"), f"{path} imports training"


def test_module_file_compiles():
    compile((MODULE / "MedSAMAgent.py").read_text(encoding="utf-8"), "MedSAMAgent.py", "exec")
