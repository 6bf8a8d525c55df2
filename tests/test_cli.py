import json
import os
import subprocess
import sys

import pytest

from prunus.cli import main


def test_passes_lists_the_registry(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("dce", "fold_constants", "simplify_masks"):
        assert name in out
    # drop_tokens' schedule: its doc's "[[layer, keep], ...]" as written (one word: a cell wraps at spaces only),
    # its type named
    assert "[[layer," in out and "<class" not in out


def test_report_table_prints_pass_text_with_brackets():
    from types import SimpleNamespace

    import prunus

    record = SimpleNamespace(spec="drop_tokens(schedule=[[layer, keep]])", kind="lossy", seconds=0.5,
                             params_before=10, params_after=10, weight_bytes_before=1e6, weight_bytes_after=1e6,
                             flops_before=2e9, flops_after=1e9, verification={"top1": 0.9}, notes=["kept [bold] text"])
    table = prunus.report_table(SimpleNamespace(pipeline=record.spec, report=[record]))
    assert str(table).splitlines()[0].strip() == "prunus: drop_tokens(schedule=[[layer, keep]])"
    assert "schedule=[[layer, keep]]" in str(table).split("\n", 1)[1] and "kept [bold] text" in str(table)
    from prunus.dump.text import _render  # prunus dump prints the same table on a console without markup

    assert "schedule=[[layer, keep]]" in _render(table) and "\\[" not in _render(table)


@pytest.mark.parametrize("argv, fragment", [
    (["optimize", "tiny-llama", "--passes", "dce, nope"], "unknown pass 'nope'"),
    (["optimize", "tiny-llama", "--passes", "dce("], "unbalanced '('"),
    (["optimize", "no-such-model", "--passes", "dce"], "unknown model 'no-such-model'"),
    (["optimize", "tiny-llama", "--passes", "dce", "--onnx"], "--onnx writes model.onnx"),
    (["optimize", "tiny-llama", "--passes", "dce", "--calib", "4"], "--calib needs a tokenizer"),
])
def test_bad_arguments_give_one_line_errors_and_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err.splitlines()[0]
    assert "Traceback" not in err


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_optimize_writes_an_artifact(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["optimize", "tiny-gpt2", "--passes", "dce, simplify_masks", "--out", str(out),
                 "--dump-dir", str(tmp_path / "dump")]) == 0
    printed = capsys.readouterr().out
    assert "simplify_masks" in printed and "artifact written" in printed
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["source"] == "tiny-gpt2" and manifest["pipeline"] == "dce, simplify_masks"
    assert "02_simplify_masks.txt" in os.listdir(tmp_path / "dump")


def test_console_script_is_installed():
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "prunus"), "passes"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "simplify_masks" in result.stdout


def test_dump_writes_formats_and_rejects_bad_paths(tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["optimize", "tiny-llama", "--passes", "dce, simplify_masks", "--out", str(art)]) == 0
    capsys.readouterr()
    assert main(["dump", str(art), "--format", "json", "-o", str(tmp_path / "g.json")]) == 0
    view = json.loads((tmp_path / "g.json").read_text())
    assert any(n["target"] == "aten.scaled_dot_product_attention" for n in view["nodes"])
    assert main(["dump", str(art), "--after", "dce"]) == 0
    assert "01_dce" in capsys.readouterr().out
    assert main(["dump", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_eval_rejects_models_without_tokenizer_and_missing_reference(capsys):
    assert main(["eval", "tiny-llama", "--task", "ppl"]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
    assert main(["eval", "tiny-llama", "--task", "nonsense"]) == 2


def test_eval_on_an_artifact_uses_its_source_tokenizer(tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["optimize", "smollm2-135m", "--passes", "simplify_masks", "--out", str(art)]) == 0
    capsys.readouterr()
    assert main(["eval", str(art), "--task", "ppl", "--seq-len", "64", "--max-tokens", "128"]) == 0
    out = capsys.readouterr().out
    value = float(out.split("windows)")[1].split()[1])
    assert 5 < value < 60
    assert main(["eval", str(art), "--task", "fidelity"]) == 0
    out = capsys.readouterr().out
    assert "top1 vs smollm2-135m" in out and "1" in out


def test_bench_lists_the_suites_and_runs_one(capfd):
    assert main(["bench"]) == 0
    out = capfd.readouterr().out
    assert "quant_linear_gpu" in out and "fuse_gpu" in out and "_report" not in out
    assert "Quantized linear ops on the GPU" in out  # each suite's docstring says what it measures
    assert main(["bench", "fuse-gpu", "--help"]) == 0  # a suite's own arguments pass through
    assert "--wide-shapes" in capfd.readouterr().out


def test_bench_errors(tmp_path, monkeypatch, capsys):
    from prunus import cli

    assert main(["bench", "no_such_suite"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'no_such_suite'" in err.splitlines()[0] and "quant_linear_gpu" in err
    assert main(["bench", "sass_count", "--no-such-flag"]) == 2  # the suite's own usage error, its exit status
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: str(tmp_path / "benchmarks"))
    assert main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err
