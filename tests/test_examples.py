"""The examples run as documented and print what they promise."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                          text=True, timeout=900, env=env)


def test_inspect_graph():
    result = _run("inspect_graph.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layer 1: sdpa attention, 4 heads / 2 kv heads" in result.stdout
    assert "is_causal': True, 'mask': None" in result.stdout


def test_quickstart(tmp_path):
    result = _run("quickstart.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reloaded artifact matches: True" in result.stdout
    assert "Paris" in result.stdout and "Rome" in result.stdout
    assert os.path.exists(tmp_path / "model.onnx") and os.path.exists(tmp_path / "artifact" / "program.pt2")
