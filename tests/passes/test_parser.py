import pytest

import prunus
from prunus.passes import build_pipeline, parse_pipeline


def test_parses_names_values_and_whitespace():
    specs = parse_pipeline(' dce ,fold_constants( ) , x( a = 1, b=-2.5e-1,c=true, d=false, e = int4_weight, '
                           'f="q s", g=[1, 2.0, name], h=[] )')
    assert [s.name for s in specs] == ["dce", "fold_constants", "x"]
    assert specs[2].args == {"a": 1, "b": -0.25, "c": True, "d": False, "e": "int4_weight", "f": "q s",
                             "g": [1, 2.0, "name"], "h": []}
    assert specs[2].column == 27
    assert specs[2].arg_columns["a"] == 30


@pytest.mark.parametrize("text, column, fragment", [
    ("", 1, "empty pipeline"),
    ("dce,,fold_constants", 5, "empty pipeline entry"),
    ("dce,", 5, "empty pipeline entry"),
    ("dce(", 4, "unbalanced '('"),
    ("dce(a=1", 4, "unbalanced '('"),
    ("dce)", 4, "unbalanced ')'"),
    ("dce(a=[1, 2)", 12, "',' or ']'"),
    ("dce(a=1,)", 9, "empty argument"),
    ("dce(a 1)", 7, "'=' after 'a'"),
    ("dce(a=)", 7, "expected a value"),
    ("dce(a='open)", 7, "unterminated string"),
    ("dce fold_constants", 5, "expected ','"),
    ("dce(a=1, a=2)", 10, "given twice"),
    ("dce $", 5, "unexpected character"),
])
def test_malformed_text_points_at_the_column(text, column, fragment):
    with pytest.raises(prunus.SpecError) as err:
        parse_pipeline(text)
    assert err.value.column == column
    assert fragment in str(err.value)
    assert str(err.value).splitlines()[-1].index("^") - 2 == column - 1  # the caret sits under the column


def test_unknown_pass_names_the_accepted_passes():
    with pytest.raises(prunus.SpecError) as err:
        build_pipeline("dce, prune_everything(ratio=0.5)")
    assert err.value.column == 6
    assert "unknown pass 'prune_everything'" in str(err.value)
    assert "fold_constants" in str(err.value) and "simplify_masks" in str(err.value)


def test_unknown_key_wrong_type_and_out_of_range_name_pass_key_and_column():
    from prunus.passes import LossyParams, Pass, param, register
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class P(LossyParams):
        ratio: float = param(0.5, "fraction removed", range="(0, 1)")
        method: str = param("rtn", "how", choices=("rtn", "gptq"))
        layers: list[int] = param([], "which layers", range="[0, 100)")

    @register
    class ToyLossy(Pass):
        """A toy pass for parser tests."""
        name = "toy_lossy_for_parser"
        Params = P
        kind = "lossy"

    text = "dce, toy_lossy_for_parser(ratio=1.5)"
    with pytest.raises(prunus.SpecError) as err:
        build_pipeline(text)
    e = err.value
    assert (e.column, e.pass_name, e.key) == (27, "toy_lossy_for_parser", "ratio")
    assert "out of range" in str(e) and "(0, 1)" in str(e)

    with pytest.raises(prunus.SpecError) as err:
        build_pipeline("toy_lossy_for_parser(ratio=true)")
    assert "wrong type" in str(err.value) and err.value.key == "ratio" and "float" in str(err.value)

    with pytest.raises(prunus.SpecError) as err:
        build_pipeline("toy_lossy_for_parser(method=awq)")
    assert "one of rtn, gptq" in str(err.value)

    with pytest.raises(prunus.SpecError) as err:
        build_pipeline("toy_lossy_for_parser(colour=1)")
    assert err.value.key == "colour" and err.value.column == 22 and "ratio" in str(err.value)

    with pytest.raises(prunus.SpecError) as err:
        build_pipeline("toy_lossy_for_parser(layers=[1, 200])")
    assert "out of range" in str(err.value)

    with pytest.raises(prunus.SpecError):
        ToyLossy(ratio=0)  # objects validate the same way as text

    p = build_pipeline("toy_lossy_for_parser(ratio=0.5, layers=[3], max_kl=0.1)")[0]
    assert p.params.ratio == 0.5 and p.params.layers == [3]
    assert p.spec() == "toy_lossy_for_parser(max_kl=0.1, layers=[3])"
    assert build_pipeline(p.spec())[0].params == p.params  # spec text round-trips


def test_passes_accepts_objects_and_rejects_other_things():
    from prunus.passes import DeadCodeElimination

    pipeline = build_pipeline([DeadCodeElimination(), "fold_constants"])
    assert [p.name for p in pipeline] == ["dce", "fold_constants"]
    with pytest.raises(prunus.SpecError):
        build_pipeline([3])
    with pytest.raises(prunus.SpecError):
        build_pipeline([])
    with pytest.raises(prunus.SpecError):
        build_pipeline("dce(ratio=1)")  # a pass without params rejects any key


def test_registry_lists_every_pass_with_doc_and_params():
    reg = prunus.passes.registry()
    for name in ("dce", "fold_constants", "simplify_masks"):
        assert name in reg
    for name, cls in reg.items():
        assert cls.name == name
        assert cls.doc(), f"{name} has no doc line"
        assert cls.kind in ("exact", "lossy")
        for f in cls.param_fields():
            assert f.metadata.get("doc"), f"{name}.{f.name} has no doc"
