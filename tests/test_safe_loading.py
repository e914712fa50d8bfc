"""Safe loading: weights only from safetensors, YAML only through safe_load, no unpickling anywhere in the package
(a torch.load only with weights_only=True), and export never writes outside its target folder."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

import stepdistill
from stepdistill.errors import StepdistillError
from stepdistill.files import safe_child

PACKAGE = Path(stepdistill.__file__).parent
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "_pickle"}
# JSON/text-only loaders: their from_pretrained reads no weights
CONFIG_LOADERS = ("Tokenizer", "Processor", "Scheduler")
# (file, call) allowed with the reason: the offline FID Inception asset is TorchScript, as torch-fidelity ships it
ALLOWED = {("eval/features.py", "torch.jit.load")}


def _name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _name(node.func) + "()"
    return "?"


def _kw(call: ast.Call, key: str):
    for k in call.keywords:
        if k.arg == key and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def unsafe_calls() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{where} imports {m}" for m in mods if m.split(".")[0] in UNPICKLERS]
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if (rel, name) in ALLOWED:
                continue
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec", "torch.jit.load", "torch.hub.load"):
                found.append(f"{where} calls {name}")
            elif name.endswith("torch.load"):
                if _kw(node, "weights_only") is not True:
                    found.append(f"{where} calls torch.load without weights_only=True")
            elif name.startswith("yaml.") and last in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                found.append(f"{where} calls {name} (use yaml.safe_load)")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
                found.append(f"{where} calls {name} without allow_pickle=False")
            elif last in ("from_pretrained", "from_single_file") and not any(c in name for c in CONFIG_LOADERS):
                if _kw(node, "use_safetensors") is not True:
                    found.append(f"{where} calls {name} without use_safetensors=True")
    return found


def test_the_package_has_no_unsafe_loading_call():
    assert unsafe_calls() == []


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scanner is not vacuous: a planted file with each unsafe call is reported line by line."""
    (tmp_path / "bad.py").write_text(
        "import pickle\nimport torch, yaml\nfrom diffusers import UNet2DModel\n"
        "torch.load('x.pt')\nyaml.load(open('c'))\nUNet2DModel.from_pretrained('d')\neval('1')\n"
        "torch.load('y.pt', weights_only=True)\nyaml.safe_load('a: 1')\nUNet2DModel.from_pretrained('d', use_safetensors=True)\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert unsafe_calls() == ["bad.py:1 imports pickle", "bad.py:4 calls torch.load without weights_only=True",
                              "bad.py:5 calls yaml.load (use yaml.safe_load)",
                              "bad.py:6 calls UNet2DModel.from_pretrained without use_safetensors=True",
                              "bad.py:7 calls eval"]


@pytest.mark.parametrize("name", ["../escape", "/etc/evil", "a/../../b", "", "..", "a\\..\\b"])
def test_names_leaving_the_target_folder_are_refused(tmp_path, name):
    with pytest.raises(StepdistillError, match="would be written outside"):
        safe_child(tmp_path / "student", name)


def test_safe_names_stay_inside(tmp_path):
    assert safe_child(tmp_path, "unet") == tmp_path / "unet"
    assert safe_child(tmp_path, "round-01/student") == tmp_path / "round-01" / "student"


def test_export_refuses_a_network_named_outside_its_folder(tmp_path):
    from stepdistill.export import export_student

    fake = SimpleNamespace(teacher_info=None, networks_or_live=lambda networks: {"../../evil": None})
    with pytest.raises(StepdistillError, match=r"exported network '../../evil' would be written outside"):
        export_student(fake, tmp_path / "out" / "student", steps=1)
    assert list(tmp_path.rglob("*")) == []
