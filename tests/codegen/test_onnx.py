import os

import numpy as np
import pytest
import torch

import prunus
from prunus.codegen.onnx import run_onnx
from prunus.models import example_inputs
from tests.conftest import main_output


def test_onnx_export_runs_at_a_new_shape(arch, tiny_models, cleaned, tmp_path):
    import onnx

    model, _ = tiny_models(arch)
    opt = cleaned(arch)
    path = opt.export_onnx(str(tmp_path / "m.onnx"))
    proto = onnx.load(path)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str)  # batch stays dynamic
    assert isinstance(dims[1], str) == (arch != "vit")  # and so does the sequence
    xs = example_inputs(model, batch=3, seq=11, seed=7)
    got = run_onnx(path, list(xs), [i.name for i in opt.graph.inputs])
    want = main_output(model(*xs)).detach().numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-3, atol=1e-3)
    assert os.listdir(tmp_path) == ["m.onnx"]  # nothing else left behind


@torch.library.custom_op("prunus_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(torch.nn.Module):
    def forward(self, x):
        return mystery(x) + 1


def test_unsupported_op_is_an_export_error_naming_it(tmp_path):
    opt = prunus.optimize(UsesMystery(), "dce", example_inputs=(torch.randn(2, 3, 4),))
    with pytest.raises(prunus.ExportError, match="prunus_test"):
        opt.export_onnx(str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


class SmallMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def test_onnxruntime_failing_to_run_the_model_is_an_export_error(tmp_path):
    """onnxruntime's CPU provider has no bf16 Mul among others: the parity check's session fails, which is a typed
    error that says so, and nothing is written. Unchecked, the file is written."""
    opt = prunus.optimize(SmallMLP().bfloat16(), "dce", example_inputs=(torch.randn(2, 3, 8).bfloat16(),))
    with pytest.raises(prunus.ExportError, match="onnxruntime cannot run the exported model.*bf16 kernels"):
        opt.export_onnx(str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []
    assert os.listdir(os.path.dirname(opt.export_onnx(str(tmp_path / "m.onnx"), check=False))) == ["m.onnx"]
