"""What the docs show as code is the code: an engine copied from docs/engines.md's skeleton runs as is."""

import ast
import inspect
import re
from pathlib import Path

from fastformers.engines import Engine

DOCS = Path(__file__).resolve().parent.parent / "docs"


def engine_skeleton() -> str:
    """The python block of docs/engines.md that subclasses Engine."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "engines.md").read_text(), flags=re.DOTALL)
    (skeleton,) = [block for block in blocks if "(Engine):" in block]
    return skeleton


def documented_methods(source: str) -> dict[str, list[str]]:
    """{method: its parameter names, in order} of the first class in `source`."""
    cls = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    return {
        node.name: [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
        for node in cls.body
        if isinstance(node, ast.FunctionDef)
    }


def test_the_engine_skeleton_overrides_engine_methods_with_their_signatures():
    methods = documented_methods(engine_skeleton())
    assert {"prepare", "load", "unavailable"} <= set(methods)
    for name, parameters in methods.items():
        assert name in vars(Engine), f"docs/engines.md: {name} is not a method of Engine"
        assert parameters == list(inspect.signature(getattr(Engine, name)).parameters), name


def test_the_engine_skeleton_runs_where_its_runtime_is_missing():
    """Defined from the doc's text, it instantiates and answers `unavailable` the way the benchmark asks."""
    namespace: dict = {}
    exec(compile(engine_skeleton(), "docs/engines.md", "exec"), namespace)  # our own doc's code
    engine = namespace["MyEngine"](some_option=1)
    assert "myruntime" in engine.unavailable("fp32", {"x": 1})
    assert engine.unavailable("fp32") == engine.unavailable("fp32", None)
