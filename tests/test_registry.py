"""Every method is one file plus its configs: the quickstart and the training scripts find methods through the
registry, and every registered method passes the shared distiller suite."""

import ast
from pathlib import Path

import yaml

from stepdistill.distillers import REGISTRY, available_methods, family_methods
from stepdistill.paths import CONFIGS
from stepdistill.quickstart import quickstart_configs

TESTS = Path(__file__).parent


def suite_methods() -> set[str]:
    """The methods of the config files that the shared-suite subclasses in tests/ run."""
    methods = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "DistillerSuite" for b in node.bases):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "config_file":
                        methods.add(yaml.safe_load((CONFIGS / stmt.value.value).read_text())["method"])
    return methods


def test_every_registered_method_has_a_shared_suite_subclass():
    missing = sorted(set(available_methods()) - suite_methods())
    assert missing == [], f"registered methods without a DistillerSuite subclass in tests/: {missing}"


def test_quickstart_and_scripts_list_the_registry():
    configs = quickstart_configs()
    assert set(configs) == {m for m in available_methods() if REGISTRY[m].quickstart_config}
    assert {"cd", "lcm", "tcd", "pcm", "progressive", "guidance"} <= set(configs)
    for method, file in configs.items():
        assert yaml.safe_load((CONFIGS / "digits" / file).read_text())["method"] == method
    assert family_methods("consistency") == ("cd", "lcm", "pcm", "tcd")
    assert family_methods("progressive") == ("guidance", "progressive")
    for method in available_methods():  # every method belongs to a family with a training script
        family = REGISTRY[method].family
        assert (CONFIGS.parent / "scripts" / f"train_{family}.py").is_file(), method
