"""The extension as the Extensions Index and Slicer's build expect it: CMake listings and metadata, the
catalogue entry against the index's schema, the icon, requirements, and the module file itself."""
import ast
import json
import py_compile
import re
import struct
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from MedSAMAgentLib.slicer_support.dependencies import load_requirements, normalize

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedSAMAgent"
SCHEMA = Path(__file__).parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
RESOURCE_SUFFIXES = (".png", ".json", ".txt", ".ui", ".svg")


def cmake_list(text: str, name: str) -> list[str]:
    m = re.search(r"set\(\s*" + name + r"\s+(.*?)\)", text, re.S)
    assert m, f"no set({name} ...) in CMake"
    return [line.split("#")[0].strip().replace("${MODULE_NAME}", "MedSAMAgent")
            for line in m.group(1).splitlines() if line.split("#")[0].strip()]


def cmake_var(text: str, name: str) -> str:
    m = re.search(r'set\(\s*' + name + r'\s+"([^"]*)"\s*\)', text)
    assert m, f"{name} is not set in the root CMakeLists.txt"
    return m.group(1)


def module_files(suffixes) -> set[str]:
    return {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
            if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}


# ---------------------------------------------------------------------- the module's CMake
def test_every_python_file_and_resource_is_listed_in_the_module_cmake():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts, resources = cmake_list(text, "MODULE_PYTHON_SCRIPTS"), cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    assert set(scripts) == module_files((".py",)), "SCRIPTS must list exactly the module's .py files"
    assert set(resources) == module_files(RESOURCE_SUFFIXES), "RESOURCES must list exactly the module's resources"
    assert {"Resources/requirements.txt", "Resources/Icons/MedSAMAgent.png"} <= set(resources)


def test_the_module_cmake_builds_a_scripted_module_with_its_tests():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"set\(MODULE_NAME MedSAMAgent\)", text)
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    for word in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}",
                 "WITH_GENERIC_TESTS"):
        assert word in build
    testing = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", text, re.S)
    assert testing and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in testing.group(1)


# ---------------------------------------------------------------------- the extension's CMake and catalogue entry
def test_root_cmake_has_the_extension_metadata_and_build_steps():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(MedSAMAgent\)", text, re.M)
    assert cmake_var(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_var(text, "EXTENSION_DEPENDS") == "PyTorch"
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert cmake_var(text, name).strip(), f"{name} is empty"
    for url in [cmake_var(text, "EXTENSION_HOMEPAGE"), cmake_var(text, "EXTENSION_ICONURL"),
                *cmake_var(text, "EXTENSION_SCREENSHOTURLS").split()]:
        assert url.startswith("https://"), url
    # the icon URL points at this repository's icon file
    icon_url = cmake_var(text, "EXTENSION_ICONURL")
    icon = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", icon_url)
    assert icon and (ROOT / icon.group(1)).is_file()
    for shot in cmake_var(text, "EXTENSION_SCREENSHOTURLS").split():  # no broken picture in the catalogue
        found = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", shot)
        assert found and (ROOT / found.group(1)).is_file(), shot
    # the same patterns the Extensions Index's checker uses to find them
    assert re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text)
    assert re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text)
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MedSAMAgent)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(step) for step in order]
    assert -1 not in positions and positions == sorted(positions)
    assert (ROOT / "LICENSE").is_file()


def test_the_catalogue_entry_validates_against_the_extensions_index_schema():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    raw = (ROOT / "MedSAMAgent.json").read_bytes()
    assert b"\r" not in raw  # the index accepts LF line endings only
    entry = json.loads(raw)
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(entry, schema, cls=jsonschema.Draft7Validator)
    assert entry["$schema"].split("#")[0] == schema["$id"].split("#")[0]
    root = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert entry["category"] == cmake_var(root, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_var(root, "EXTENSION_DEPENDS").split()
    # the index's naming rules: the entry is named after project(), the repository starts with "Slicer"
    repo = entry["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert entry["scm_url"].startswith("https://") and repo.startswith("Slicer")
    assert not "MedSAMAgent".lower().startswith("slicer")
    assert cmake_var(root, "EXTENSION_HOMEPAGE").rstrip("/").endswith(repo)
    # the schema is strict: it would catch a wrong entry
    for bad in ({**entry, "tier": 7}, {**entry, "scm_type": "svn"}, {**entry, "homepage": "x"},
                {k: v for k, v in entry.items() if k != "scm_url"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)


def test_the_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "MedSAMAgent.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


# ---------------------------------------------------------------------- requirements
def test_requirements_have_lower_bounds_that_agree_with_the_package():
    reqs = load_requirements(MODULE / "Resources" / "requirements.txt")
    assert reqs and all(r.minimum for r in reqs), "every requirement needs a lower bound (name>=version)"
    names = {r.key for r in reqs}
    assert not names & {"torch", "torchvision"}, "torch comes from the PyTorch extension"
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M | re.S)
    pyproject = re.findall(r'"([^"]+)"', block.group(1))
    bounds = {normalize(m.group(1)): m.group(2) for m in (re.match(r"([\w.-]+)>=([\w.]+)", d) for d in pyproject) if m}
    assert "numpy" in bounds
    for r in reqs:
        if r.key in bounds:
            assert r.minimum == bounds[r.key], f"{r.name}: {r.minimum} here, {bounds[r.key]} in pyproject.toml"
    from MedSAMAgentLib.slicer_support.dependencies import CORE

    assert set(CORE) <= names, "the core group must be installable from requirements.txt"


# ---------------------------------------------------------------------- the module file
def module_tree():
    return ast.parse((MODULE / "MedSAMAgent.py").read_text(encoding="utf-8"))


def test_the_module_compiles_and_has_module_widget_logic_test(tmp_path):
    py_compile.compile(str(MODULE / "MedSAMAgent.py"), cfile=str(tmp_path / "m.pyc"), doraise=True)
    classes = {n.name: n for n in module_tree().body if isinstance(n, ast.ClassDef)}
    bases = {name: {ast.unparse(b) for b in c.bases} for name, c in classes.items()}
    assert "ScriptedLoadableModule" in bases["MedSAMAgent"]
    assert "ScriptedLoadableModuleWidget" in bases["MedSAMAgentWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["MedSAMAgentLogic"]
    assert "ScriptedLoadableModuleTest" in bases["MedSAMAgentTest"]
    assert [ast.unparse(d) for d in classes["MedSAMAgentParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    test_methods = {f.name for f in classes["MedSAMAgentTest"].body if isinstance(f, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and any(m.startswith("test_") for m in test_methods)
    source = ast.unparse(classes["MedSAMAgentTest"])
    for needed in ("SampleData", "downloadSample", "auto_segment_and_override", "ensureDependencies"):
        assert needed in source, f"the self-test should use {needed}"
    # its body is shared with the slicer-core tests (Testing/slicer_core/test_self_test.py runs it for real)
    body = (MODULE / "MedSAMAgentLogic" / "self_test.py").read_text(encoding="utf-8")
    for needed in ("REPLAY", "bundled_tool()", "addPoint", "not np.array_equal(before, after)", "undoLast"):
        assert needed in body, f"the self-test should use {needed}"
    module = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "MedSAMAgent")
    text = ast.unparse(module)
    assert "parent.categories = ['Segmentation']" in text
    for attribute in ("title", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attribute} =" in text


def test_the_module_imports_no_torch_and_installs_nothing_when_loading():
    tree = module_tree()
    for part in ("logic", "contexts", "markups", "setup_jobs", "host", "segment_voxels",
                 "worklist_review"):  # loaded with the module
        tree.body += ast.parse((MODULE / "MedSAMAgentLogic" / f"{part}.py").read_text(encoding="utf-8")).body
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append((node.module or "").split(".")[0])
    assert not {"torch", "torchvision", "transformers", "sam2"} & set(top)
    assert set(top) <= {"__future__", "tempfile", "concurrent", "dataclasses", "importlib", "json", "logging", "os",
                        "shutil", "sys",
                        "threading", "time", "weakref", "typing", "numpy", "qt", "vtk", "slicer", "MedSAMAgentLib",
                        "MedSAMAgentLogic"}
    # the engine pieces it imports at load time pull in no torch either (run them in a fresh interpreter)
    engine = "\n".join(ast.unparse(n) for n in tree.body
                        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("MedSAMAgentLib"))
    probe = engine + "\nimport sys\nprint(sorted(m for m in ('torch', 'transformers', 'sam2', 'cv2', 'fastapi') " \
                     "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=MODULE, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSAMAgentWidget")
    init = next(f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    called = {ast.unparse(c.func) for c in ast.walk(init) if isinstance(c, ast.Call)}
    assert not [c for c in called if re.search(r"pip_|install|download|ensure|start", c, re.I)], called
    module_level = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.ClassDef,
                                                                ast.FunctionDef, ast.Assign, ast.Expr))]
    assert module_level == []


def test_slicer_support_imports_only_numpy_simpleitk_and_the_standard_library():
    """What Slicer's own Python ships (SimpleITK: the volume file for the worker), nothing to install."""
    for path in (MODULE / "MedSAMAgentLib" / "slicer_support").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                assert top in ("numpy", "SimpleITK") or top in sys.stdlib_module_names, f"{path.name} imports {name}"
