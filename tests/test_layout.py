"""The architecture as the folders show it: cnnedge.infer (and the shared modules) never import torch or the
training package, no module imports another that imports it back, and every inference path hands the
network the same input for the same image."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from conftest import MODEL, ROOT
from cnnedge.infer.files import read_image
from cnnedge.infer.predictor import Predictor
from cnnedge.infer.webcam import FrameClassifier

PACKAGE = ROOT / "cnnedge"
TRAINING = ("torch", "torchvision", "onnx", "onnxscript", "matplotlib", "optuna", "cnnedge.train")
# Shared by both sides, so torch-free too. bench.py is the one module that may reach into training (its
# PyTorch rows), and only inside the functions that need it.
SHARED = ("__init__", "__main__", "atomic", "choices", "cli", "errors", "metrics", "report", "synth")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module `path` imports (absolute names), at any depth of the file unless `top_level_only`."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from cnnedge.infer import files`
    return names


def torch_free_modules() -> list[Path]:
    return sorted((PACKAGE / "infer").rglob("*.py")) + [PACKAGE / f"{name}.py" for name in SHARED]


@pytest.mark.parametrize("path", torch_free_modules(), ids=lambda p: module_name(p))
def test_the_inference_side_never_imports_training_code(path):
    bad = {name for name in imports(path) if name.split(".")[0] in TRAINING or name.startswith("cnnedge.train")}
    if path.name == "cli.py":  # the CLI names the training commands' modules inside those commands only
        bad = {name for name in imports(path, top_level_only=True) if name.split(".")[0] in TRAINING
               or name.startswith("cnnedge.train")}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


def test_bench_reaches_into_training_only_inside_functions():
    top = imports(PACKAGE / "bench.py", top_level_only=True)
    assert not {n for n in top if n.split(".")[0] in TRAINING or n.startswith("cnnedge.train")}


def test_no_import_cycles():
    """Imports between cnnedge modules, at any depth of a file, form no cycle (the package root, which only
    holds the version and a lazy `Predictor`, is left out)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports(path) if m in modules and m != "cnnedge" and m != name}
    graph.pop("cnnedge", None)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, [node]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_torch_free_side_really_imports_without_torch():
    """Importing every torch-free module in a fresh interpreter loads no training library."""
    names = [module_name(p) for p in torch_free_modules() if p.name != "__main__.py"]
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in %r or m.startswith('cnnedge.train')))" % (TRAINING,))
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# ------------------------------------------------------------------------- one preprocessing rule


@pytest.fixture(scope="module")
def same_images(tmp_path_factory, data_root) -> Path:
    """An ImageFolder tree of the kinds that take different paths through preprocessing: MNIST crops as
    28x28 PNG (the shortcut), 28x28 dark-on-white drawings, photos, a 16-bit scan, an RGBA drawing."""
    from cnnedge.infer.files import read_idx

    root = tmp_path_factory.mktemp("same") / "tree"
    mnist = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte")[:6]
    labels = read_idx(data_root / "MNIST/raw/t10k-labels-idx1-ubyte")[:6]
    for i, (img, y) in enumerate(zip(mnist, labels)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / str(y) / f"mnist_{i}.png"), img)
        cv2.imwrite(str(root / str(y) / f"inverted_{i}.png"), 255 - img)
    for p in (ROOT / "samples").rglob("*"):
        if p.is_file() and p.suffix != ".py" and max(read_image(p).shape[:2]) <= 2048:
            (root / p.parent.name).mkdir(exist_ok=True)
            shutil.copy(p, root / p.parent.name / p.name)
    return root


def model_with_mode(mode: str, folder: Path) -> Path:
    if mode == "digit":
        return MODEL
    proto = onnx.load(MODEL)
    for prop in proto.metadata_props:
        if prop.key == "preprocess":
            prop.value = mode
    path = folder / f"cnn.{mode}.onnx"
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("mode", ["digit", "fit"])
def test_predict_webcam_and_imagefolder_training_see_the_same_input(mode, same_images, tmp_path):
    from cnnedge.train.data import load_imagefolder

    files = sorted(p for p in same_images.rglob("*") if p.is_file())
    model = model_with_mode(mode, tmp_path)
    with Predictor(model, "cpu") as predictor:
        predicted = predictor._prepare_chunk([str(p) for p in files])
    assert all(error is None for _, error, _ in predicted), [e for _, e, _ in predicted if e]

    classifier = FrameClassifier(model, "cpu", smooth=1, work_size=4096)
    trained = load_imagefolder(same_images, mode=mode)
    by_class = {c: sorted(p for p in (same_images / c).rglob("*") if p.is_file()) for c in trained.class_names}
    order = [p for c in trained.class_names for p in by_class[c]]
    training_input = {p: trained.x_train[i, 0].numpy() for i, p in enumerate(order)}

    checked = 0
    for path, (x, _, _) in zip(files, predicted):
        np.testing.assert_array_equal(training_input[path], x, err_msg=f"imagefolder loader vs predict: {path.name}")
        image = read_image(path)
        if image.dtype != np.uint8 or image.ndim == 3 and image.shape[2] == 4:
            continue  # a camera gives 8-bit BGR frames
        frame = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = frame.shape[:2]
        result = classifier.classify(frame, 0, (0, 0, w, h))
        assert result.input is not None or mode == "digit", path.name
        if result.input is not None:
            # The same pixels as a BGR frame: float rounding of the colour conversion is the only difference.
            np.testing.assert_allclose(result.input, x, atol=1e-6, err_msg=f"webcam vs predict: {path.name}")
            checked += 1
    assert checked >= 10
