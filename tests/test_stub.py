"""The shipped type stub `ktrs/_native.pyi` says what `ktrs._native` really has: the same
public names, classes, methods, properties and parameter names (and `py.typed` ships)."""

import ast
import inspect
import os

import ktrs
from ktrs import _native

STUB = os.path.join(os.path.dirname(ktrs.__file__), "_native.pyi")


def stub_tree():
    with open(STUB) as f:
        return ast.parse(f.read())


def params(fn: ast.FunctionDef):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
    return names, [x.arg for x in a.kwonlyargs]


def runtime_params(obj):
    sig = inspect.signature(obj)
    pos = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "cls")]
    kw = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
    return pos, kw


def test_py_typed_ships_next_to_the_stub():
    assert os.path.isfile(os.path.join(os.path.dirname(STUB), "py.typed"))


def test_stub_names_match_the_module():
    tree = stub_tree()
    declared = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            declared.add(node.target.id)
    declared.discard("Tensor")  # a typing alias of the stub only
    actual = {n for n in dir(_native) if not n.startswith("__")} | {"__version__"}
    assert declared == actual


def test_stub_classes_match_methods_properties_and_parameters():
    for node in stub_tree().body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(_native, node.name)
            if issubclass(cls, BaseException):
                stub_bases = [b.id for b in node.bases]
                assert stub_bases == [b.__name__ for b in cls.__bases__], node.name
                continue
            members = {}
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and not any(isinstance(d, ast.Attribute) for d in fn.decorator_list):
                    members[fn.name] = fn
            public = {n for n in dir(cls) if not n.startswith("_")}
            assert public == set(members) - {"__new__"}, node.name
            for name, fn in members.items():
                is_prop = any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)
                attr = inspect.getattr_static(cls, name)
                if is_prop:
                    assert type(attr).__name__ == "getset_descriptor", (node.name, name)
                    continue
                target = cls if name == "__new__" else getattr(cls, name)
                assert params(fn) == runtime_params(target), (node.name, name)
        elif isinstance(node, ast.FunctionDef):
            assert params(node) == runtime_params(getattr(_native, node.name)), node.name


def test_setters_in_the_stub_are_the_writable_properties():
    tree = stub_tree()
    experts = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Experts")
    setters = {fn.name for fn in experts.body if isinstance(fn, ast.FunctionDef) and any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in fn.decorator_list)}
    e = _native.Experts.empty(1, 8, 8, threads=1)
    writable = set()
    for name in (n for n in dir(_native.Experts) if not n.startswith("_")):
        if type(inspect.getattr_static(_native.Experts, name)).__name__ != "getset_descriptor":
            continue
        try:
            setattr(e, name, getattr(e, name))
            writable.add(name)
        except AttributeError:
            pass
    assert setters == writable
