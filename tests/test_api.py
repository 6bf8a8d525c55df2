import json
import os

import pytest
import torch

import prunus
from prunus.models import example_inputs
from tests.conftest import main_output


def test_save_load_round_trip(arch, tiny_models, cleaned, tmp_path):
    model, _ = tiny_models(arch)
    opt = cleaned(arch)
    out = opt.save(str(tmp_path / "art"))
    assert sorted(os.listdir(out)) == ["ir", "pipeline.json", "program.pt2"]
    assert sorted(os.listdir(tmp_path / "art" / "ir")) == ["00_captured.json", "01_dce.json", "02_fold_constants.json",
                                                          "03_simplify_masks.json"]
    manifest = json.loads((tmp_path / "art" / "pipeline.json").read_text())
    assert manifest["pipeline"] == "dce, fold_constants, simplify_masks"
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["prunus"]
    assert [r["name"] for r in manifest["report"]] == ["dce", "fold_constants", "simplify_masks"]
    loaded = prunus.load(out)
    assert loaded.pipeline == opt.pipeline and [r.name for r in loaded.report] == ["dce", "fold_constants",
                                                                                  "simplify_masks"]
    xs = example_inputs(model, batch=3, seq=7, seed=5)
    got = loaded(*xs)
    assert type(got) is type(model(*xs))
    torch.testing.assert_close(main_output(got), main_output(model(*xs)), rtol=1e-4, atol=1e-4)
    assert loaded.graph.analysis("attention_sites")[1].layer == 1  # module paths survive the round trip


def test_save_is_atomic(tiny_models, cleaned, tmp_path, monkeypatch):
    opt = cleaned("llama")
    target = tmp_path / "art"
    opt.save(str(target))
    before = (target / "pipeline.json").read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        opt.save(str(target))
    with pytest.raises(OSError):
        opt.save(str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path)) == ["art"]  # no half-written or temporary directory
    assert (target / "pipeline.json").read_text() == before


def test_load_rejects_what_is_not_an_artifact(tmp_path, cleaned):
    with pytest.raises(prunus.ArtifactError, match="not an artifact directory"):
        prunus.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(prunus.ArtifactError, match="lacks pipeline.json"):
        prunus.load(str(tmp_path / "empty"))
    art = cleaned("gpt2").save(str(tmp_path / "art"))
    manifest = json.loads((tmp_path / "art" / "pipeline.json").read_text())
    (tmp_path / "art" / "pipeline.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(prunus.ArtifactError, match="format 99"):
        prunus.load(art)
    (tmp_path / "art" / "pipeline.json").write_text(json.dumps(manifest))
    (tmp_path / "art" / "program.pt2").write_bytes(b"not a zip")
    with pytest.raises(prunus.ArtifactError, match="cannot read"):
        prunus.load(art)
    (tmp_path / "art" / "pipeline.json").write_text("{")
    with pytest.raises(prunus.ArtifactError, match="unreadable"):
        prunus.load(art)


def test_calling_with_wrong_inputs_is_a_typed_error(cleaned):
    opt = cleaned("llama")
    with pytest.raises(prunus.InputError, match="2 dims"):
        opt(torch.randint(0, 10, (5,)))
    with pytest.raises(prunus.InputError, match="torch.int64"):
        opt(torch.randn(2, 3))
    with pytest.raises(prunus.InputError, match="structure"):
        opt(torch.randint(0, 10, (2, 3)), torch.randint(0, 10, (2, 3)))
    with pytest.raises(prunus.InputError, match="keyword"):
        opt(input_ids=torch.randint(0, 10, (2, 3)))


def test_optimize_argument_errors(tiny_models):
    model, x = tiny_models("llama")
    with pytest.raises(prunus.CaptureError, match="example_inputs is required"):
        prunus.optimize(model, "dce")
    with pytest.raises(prunus.SpecError):
        prunus.optimize(model, "dce(", example_inputs=x)
    with pytest.raises(prunus.SpecError, match="calibration sample 1"):
        prunus.optimize(model, "dce", example_inputs=x, calibration=[x, (torch.randn(2, 3),)])


def test_kv_policy_survives_save_and_load(tiny_models, tmp_path):
    from prunus.eval.decode import PrefixDecoder, decoder
    from prunus.passes.kv import KVDecoder
    from prunus.passes.kv.policies import SnapKV

    model, x = tiny_models("llama")
    opt = prunus.optimize(model, "kv_cache(policy=snapkv, budget=12, sink=2, window=4)", example_inputs=x)
    art = opt.save(str(tmp_path / "kv"))
    assert "prefill.onnx" not in os.listdir(art)  # the KV graphs go to ONNX only with onnx=True
    manifest = json.loads((tmp_path / "kv" / "pipeline.json").read_text())
    assert manifest["kv"] == opt.graph.kv and manifest["kv"]["budget"] == 12
    loaded = prunus.load(art)
    assert loaded.graph.kv == opt.graph.kv
    dec = decoder(loaded)
    assert isinstance(dec, KVDecoder) and isinstance(dec.policy, SnapKV) and dec.policy.budget == 12
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    want, want_stats = prunus.generate(opt, ids, 8, return_stats=True)
    got, stats = prunus.generate(loaded, ids, 8, return_stats=True)
    assert torch.equal(got, want) and stats["kv_bytes"] == want_stats["kv_bytes"]
    assert dec.feed(ids) is not None and max(dec.cache_lengths()) == 12  # the budget evicts on reload too
    # an artifact written before KV policies were saved has no "kv" key: it loads as a plain graph
    del manifest["kv"]
    (tmp_path / "kv" / "pipeline.json").write_text(json.dumps(manifest))
    old = prunus.load(art)
    assert old.graph.kv is None and isinstance(decoder(old), PrefixDecoder)
    torch.testing.assert_close(main_output(old(ids)), model(ids).logits, rtol=1e-4, atol=1e-4)
