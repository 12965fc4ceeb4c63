"""Stage code versions come from the import graph: every file a stage can run, no file it cannot."""
from __future__ import annotations

from pathlib import Path

from ssl4sci.code_graph import PACKAGE_DIR, code_version, stage_files


def names(files: list[Path], root: Path = PACKAGE_DIR) -> set[str]:
    return {str(p.relative_to(root)) for p in files}


def write_package(root: Path) -> Path:
    """A tiny ssl4sci package: relative, absolute, from-package and function-level imports, and a module no one
    imports."""
    pkg = root / "ssl4sci"
    for rel, text in {
        "__init__.py": "",
        "stage.py": "from .helpers import tool\nfrom ssl4sci.sub import leaf\n\ndef run():\n    from . import late\n",
        "helpers.py": "import numpy as np\nfrom ssl4sci.io import write\n",
        "io.py": "import json\n",
        "late.py": "",
        "sub/__init__.py": "",
        "sub/leaf.py": "from ..io import write\nfrom . import sibling\n",
        "sub/sibling.py": "",
        "unused.py": "import ssl4sci.stage\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_graph_follows_every_kind_of_import_and_nothing_else(tmp_path):
    pkg = write_package(tmp_path)
    assert names(stage_files(["ssl4sci.stage"], pkg), pkg) == {
        "__init__.py", "stage.py", "helpers.py", "io.py", "late.py", "sub/__init__.py", "sub/leaf.py", "sub/sibling.py"}


def test_the_version_changes_with_an_imported_file_only(tmp_path):
    pkg = write_package(tmp_path)
    before = code_version(["ssl4sci.sub.leaf"], pkg)
    (pkg / "late.py").write_text("x = 1\n")  # not imported by leaf
    assert code_version(["ssl4sci.sub.leaf"], pkg) == before
    (pkg / "io.py").write_text("import json\nimport os\n")
    assert code_version(["ssl4sci.sub.leaf"], pkg) != before


def test_the_real_stages_include_what_they_import():
    finetune = names(stage_files(["ssl4sci.finetune"]))
    assert {"ssl/augment.py", "ssl/crops.py", "supervised.py", "io.py"} <= finetune  # crops: the drift once missed
    assert "pretrain.py" not in finetune and "report.py" not in finetune
    assert names(stage_files(["ssl4sci.report"])) >= {"report.py", "failures.py", "io.py"}


def test_pretraining_covers_the_methods_it_loads_by_name_and_fetch_the_chosen_source():
    from ssl4sci.registry.stages import stage_entries

    pretrain = names(stage_files([f"ssl4sci.{m}" for m in stage_entries("pretrain", "simulate")]))
    assert {"pretrain.py", "ssl/dino.py", "ssl/esvit.py", "ssl/losses.py", "ssl/augment.py"} <= pretrain
    assert "evaluate.py" not in pretrain and "embed.py" not in pretrain  # the k-NN monitor uses neutral modules
    # one registry module per table: adding a protocol or a source leaves pretraining's code version alone
    assert "registry/methods.py" in pretrain and not {"registry/protocols.py", "registry/sources.py"} & pretrain
    assert stage_entries("fetch", "vlm4bio") == ["sources.hub"]
    assert stage_entries("prepare", "image_folder") == ["prepare_photos"]
    assert stage_entries("prepare", "deeplense") == ["prepare"]
