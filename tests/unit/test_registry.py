"""The generic registry behind the extension points: names in, entries out, one-line errors."""

import ast
from pathlib import Path

import pytest

import her2lab.registry
from her2lab.errors import Her2labError, ManifestError
from her2lab.registry import Registry


class ThingError(Her2labError):
    """The error class a registry of things raises for an unknown name."""


@pytest.fixture
def things() -> Registry[int]:
    reg: Registry[int] = Registry("thing", key="model.thing", error=ThingError)
    reg.register("zeta", 1)
    reg.register("alpha", 2)
    return reg


def test_register_and_get(things):
    assert things.register("mid", 3) == 3  # handed back, so a decorator can return it
    assert things.get("mid") == 3 and things.get("alpha") == 2
    assert "mid" in things and "nope" not in things
    assert len(things) == 3


def test_a_name_registered_twice_is_refused(things):
    with pytest.raises(Her2labError, match=r"^thing 'zeta' is registered twice; pick another name$"):
        things.register("zeta", 9)
    assert things.get("zeta") == 1  # the first entry stays


def test_replace_takes_the_old_entrys_place(things):
    things.register("zeta", 9, replace=True)
    assert things.get("zeta") == 9 and things.names() == ["alpha", "zeta"]


def test_unregister_removes_and_tolerates_absent_names(things):
    things.unregister("zeta")
    things.unregister("zeta")  # absent now: no error
    things.unregister("never")
    assert "zeta" not in things and things.names() == ["alpha"]


def test_names_sorted_iteration_in_registration_order(things):
    things.register("mid", 3)
    assert things.names() == ["alpha", "mid", "zeta"]
    assert list(things) == ["zeta", "alpha", "mid"]
    assert things.items() == [("zeta", 1), ("alpha", 2), ("mid", 3)]


def test_iterating_while_registering_is_safe(things):
    for name in things:
        things.register(name + "2", 0)
    assert things.names() == ["alpha", "alpha2", "zeta", "zeta2"]


def test_unknown_name_names_the_key_and_lists_the_registered_names(things):
    with pytest.raises(ThingError, match=r"^model\.thing='nope': use one of alpha, zeta$") as err:
        things.get("nope")
    assert isinstance(err.value, Her2labError) and "\n" not in str(err.value)


def test_unknown_name_without_a_key():
    reg: Registry[str] = Registry("widget")
    reg.register("b", "x")
    reg.register("a", "y")
    with pytest.raises(Her2labError, match=r"^widget 'nope' is not registered; use one of a, b$"):
        reg.get("nope")


def test_unknown_name_with_an_own_message():
    reg: Registry[int] = Registry("metric", error=ManifestError, unknown="no {name!r}; known: {registered} ({names})")
    reg.register("b", 1)
    reg.register("a", 2)
    with pytest.raises(ManifestError, match=r"^no 'nope'; known: b, a \(a, b\)$"):
        reg.get("nope")


def test_an_empty_registry_still_says_what_is_wrong():
    with pytest.raises(Her2labError, match=r"^x\.y='z': use one of $"):
        Registry("thing", key="x.y").get("z")


def test_the_registry_imports_only_the_errors_from_her2lab():
    tree = ast.parse(Path(her2lab.registry.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m.startswith("her2lab")} == {"her2lab.errors"}
