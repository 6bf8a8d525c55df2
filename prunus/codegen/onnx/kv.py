"""ONNX export of a `kv_cache` model's prefill and decode graphs, and a decoder that runs them in onnxruntime.

`export_kv_onnx(graph, directory)` writes `prefill.onnx` and `decode.onnx`: the graphs of
`prunus.passes.kv.rewrite` with dynamic batch, sequence and per-layer past length, positions as an input,
and the prunus attention ops lowered by `translations.py` (under `kv_quant`, decode.onnx reads the packed cache
through the lowering of `decode_attention_quantized(_scores)`). Each file carries what a runtime needs in its
metadata (`prunus.kv`: the policy, the layers, where the logits are), so the directory alone is enough.

`OrtKVDecoder(directory)` is `prunus.passes.kv.KVDecoder` with onnxruntime sessions in place of the fx
graphs: the same feed loop and the same Python policy between steps (numpy <-> torch at the session
boundary), so `prunus.generate(OrtKVDecoder(dir), ids)` and `prunus.eval` run a KV policy over ONNX Runtime.
A kv_quant cache is quantized between steps by the same Python `QuantizedLayerCache`; its bfloat16 scales cross
the boundary as OrtValues (numpy has no bfloat16).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from prunus.codegen.onnx.export import (
    EXTERNAL_DATA_BYTES,
    compare_outputs,
    failed_op,
    lower_program,
    ort_input,
    run_onnx,
)
from prunus.errors import ArtifactError, ExportError, SpecError
from prunus.passes.kv.quantized import QuantizedLayerCache
from prunus.passes.kv.rewrite import KVGraphs, KVLayer
from prunus.passes.kv.runtime import KVDecoder, kv_graphs, make_policy, resolve_spec

KV_FILES = ("prefill.onnx", "decode.onnx")
SHARED_DATA = "kv.onnx.data"  # the weights both graphs read, stored once
SHARE_MIN_BYTES = 1024  # smaller initializers stay inside each file
METADATA_KEY = "prunus.kv"
# Example sizes of the export (each dynamic dimension gets its own symbol; sizes of 1 would be fixed). The prefill
# is long enough that a token-dropping stage keeps more tokens than it must (4 sinks + the last at keep 0.25):
# with fewer, top-k would choose among tied forced tokens, which onnxruntime and torch order differently.
EXAMPLE_BATCH, PREFILL_TOKENS, DECODE_TOKENS = 2, 24, 3


def _outputs(gm) -> int:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return len(out) if isinstance(out, (tuple, list)) else 1


def _names(graphs: KVGraphs, output_names: list[str]) -> dict:
    """Input names (the graphs' placeholders) and output names: the model's outputs, `k_i`/`v_i`, then what
    the policy reads (`scores_i`, `query_norms_i` after prefill; `probs_i` after decode)."""
    layers = range(len(graphs.layers))
    kv_out = [f"{kind}_{i}" for i in layers for kind in ("k", "v")]
    prefill = output_names + kv_out + [f"scores_{i}" for i in layers if graphs.prefill_window is not None] + \
        [f"query_norms_{i}" for i in layers if getattr(graphs, "query_window", None) is not None]
    decode = output_names + kv_out + [f"probs_{i}" for i in layers if graphs.decode_probs]
    names = {}
    for which, outputs in (("prefill", prefill), ("decode", decode)):
        gm = getattr(graphs, which)
        names[f"{which}_inputs"] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        names[f"{which}_outputs"] = (outputs + [f"output_{j}" for j in range(len(outputs), _outputs(gm))])[
            :_outputs(gm)]
    return names


def _logits_index(graph) -> int:
    """Which flat output KVDecoder reads as logits (the `logits` field of a structured output, else the first)."""
    from prunus.eval.run import main_tensor

    n = len(graph.output_names())
    marks = [torch.empty(0) for _ in range(n)]
    tree = pytree.tree_unflatten(marks, graph.out_spec) if graph.out_spec is not None else marks
    picked = main_tensor(tree, ("logits",))
    return next(i for i, m in enumerate(marks) if m is picked)


def _examples(source, spec: dict):
    """Example inputs of both graphs: a prefill of PREFILL_TOKENS, then DECODE_TOKENS new tokens over the cache
    that prefill left, in whatever layout the policy keeps it (what the decode graph takes at run time)."""
    ids = source.example_inputs[0].reshape(-1)
    total = PREFILL_TOKENS + DECODE_TOKENS
    tokens = ids[torch.arange(EXAMPLE_BATCH * total) % ids.numel()].reshape(EXAMPLE_BATCH, total)
    decoder = KVDecoder(source, spec)
    decoder.feed(tokens[:, :PREFILL_TOKENS])
    caches = decoder.caches
    if spec.get("quant"):
        caches = [_quantized_example(cache, spec["quant"]) for cache in caches]
    past = [x for cache in caches for x in cache.graph_inputs()]
    prefill = (tokens[:, :PREFILL_TOKENS], torch.arange(PREFILL_TOKENS))
    decode = (tokens[:, PREFILL_TOKENS:], torch.arange(PREFILL_TOKENS, total), *past)
    # contiguous: a sliced example would be captured with a symbolic stride of its own, and layouts derived
    # from it (e.g. GPT-2's hidden states) would no longer admit the graph's views
    return tuple(tuple(x.contiguous() for x in args) for args in (prefill, decode))


def _quantized_example(cache, quant: dict) -> QuantizedLayerCache:
    """A quantized cache of two key groups and two residual entries, `cache`'s entries repeated: whatever the policy
    kept, every part of the decode graph's past then has an example length export does not fix (as it fixes 0 and 1).
    """
    group = quant["group_size"]
    n = 2 * group + 2
    reps = -(-n // cache.length)
    k, v = (x.repeat(1, 1, reps, 1)[:, :, :n] for x in (cache.k, cache.v))
    example = QuantizedLayerCache(k, v, cache.pos.repeat(1, 1, reps)[:, :, :n], bits=quant["bits"],
                                  group_size=group, residual=2)
    example.flush()
    return example


def _dynamic(args) -> tuple:
    """Batch and sequence of the ids, the positions' length; batch of every cache tensor, and the entries
    (dim 2) of the [b, heads, n, d] ones; other sizes (heads, channels) are fixed by the model and policy."""
    ids, positions, *past = args
    return ({0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO},
            *({0: Dim.AUTO, 2: Dim.AUTO} if x.dim() == 4 else {0: Dim.AUTO} for x in past))


def export_kv_onnx(graph, directory: str, spec: dict | None = None, *, check: bool = True) -> list[str]:
    """Write `prefill.onnx` and `decode.onnx` for `graph` under its KV policy (or `spec`) into `directory`
    (atomically), each checked against PyTorch in onnxruntime; returns their paths."""
    from prunus.codegen.triton import inline_fused

    spec = spec if spec is not None else graph.kv
    if spec is None:
        raise SpecError("the graph has no KV policy: run the kv_cache pass before exporting its prefill/decode graphs")
    source = inline_fused(graph)
    spec = resolve_spec(source, spec)  # e.g. duo's retrieval heads, which the runtime cannot compute
    graphs, _ = kv_graphs(source, spec)
    names = _names(graphs, source.output_names())
    flags = {f.name: getattr(graphs, f.name) for f in dataclasses.fields(KVGraphs)
             if f.name not in ("prefill", "decode", "layers", "notes")}
    meta = {"spec": spec, "layers": [dataclasses.asdict(layer) for layer in graphs.layers], "graphs": flags,
            "logits": _logits_index(source), **names}
    examples = dict(zip(("prefill", "decode"), _examples(source, spec)))
    large = sum(p.numel() * p.element_size() for p in source.gm.parameters()) > EXTERNAL_DATA_BYTES
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".prunus-onnx-") as tmp:
        for which, file in zip(("prefill", "decode"), KV_FILES):
            gm, args = getattr(graphs, which), examples[which]
            try:
                with torch.no_grad():
                    program = torch.export.export(gm, args, dynamic_shapes=_dynamic(args), strict=False)
            except Exception as e:  # noqa: BLE001 - a capture failure is an export failure of this graph
                raise ExportError(f"capturing the {which} graph for ONNX failed at {failed_op(e)}: "
                                  f"{type(e).__name__}: {str(e).strip()[:300]}") from e
            path = os.path.join(tmp, file)
            lower_program(program, path, names[f"{which}_inputs"], names[f"{which}_outputs"], external_data=large,
                          metadata={METADATA_KEY: json.dumps(meta)})
            if check:
                with torch.no_grad():
                    want = list(gm(*args))
                got = run_onnx(path, list(args), names[f"{which}_inputs"])
                compare_outputs(names[f"{which}_outputs"], got, want, where=f"{file}: ")
        _share_initializers(tmp, KV_FILES, SHARED_DATA)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    return [os.path.join(directory, f) for f in KV_FILES]


def _share_initializers(directory: str, files: tuple[str, ...], data: str, align: int = 4096) -> None:
    """Move the initializers of the ONNX `files` in `directory` into one external data file `data`, each
    distinct tensor stored once (the prefill and decode graphs hold the same weights); the external data
    files the exporter wrote for large models (`<file>.data`) go."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    stored: dict = {}
    with open(os.path.join(directory, data), "wb") as out:
        for file in files:
            path = os.path.join(directory, file)
            model = onnx.load(path)  # with any external data the exporter wrote
            for tensor in model.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < SHARE_MIN_BYTES:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in stored:
                    out.write(b"\0" * (-out.tell() % align))
                    stored[key] = out.tell()
                    out.write(raw)
                set_external_data(tensor, data, offset=stored[key], length=len(raw))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, path)
    for file in files:
        if os.path.exists(os.path.join(directory, file + ".data")):
            os.remove(os.path.join(directory, file + ".data"))


class _Session:
    """An onnxruntime session of `prefill.onnx` or `decode.onnx`, called like the fx graph it came from: torch
    tensors in, torch tensors out; `meta` is the file's `prunus.kv` metadata."""

    def __init__(self, path: str, which: str, providers=None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
            self.meta = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise ArtifactError(f"{path} is not a KV graph written by prunus ({type(e).__name__}: {e})") from e
        self.input_names = self.meta[f"{which}_inputs"]
        # an input the graph never reads (positions, in a model without position-dependent ops) is not in the file
        self.declared = {i.name for i in self.session.get_inputs()}

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: ort_input(t) for name, t in zip(self.input_names, tensors) if name in self.declared}
        return [torch.from_numpy(x) for x in self.session.run(None, feed)]


def _check_compatible(spec: dict, exported: dict, flags: dict, num_layers: int) -> None:
    """A SpecError unless the exported graphs give policy `spec` what it reads and take the cache it keeps."""
    probe, name = make_policy(spec, num_layers), spec.get("policy")
    for key in ("prefill_window", "query_window"):
        value = getattr(probe, key)
        if value is not None and value != flags.get(key):
            raise SpecError(f"policy {name} needs {key}={value} from {KV_FILES[0]}, which was exported with "
                            f"{flags.get(key)}: export it for this policy")
    if probe.decode_probs and not flags.get("decode_probs"):
        raise SpecError(f"policy {name} reads each decode step's attention, which {KV_FILES[1]} does not report: "
                        "export it for this policy")
    layouts = {"ragged": probe.ragged, "key_channels": probe.key_channels, "quant": spec.get("quant")}
    for key, value in layouts.items():
        if bool(value) != bool(flags.get(key)):
            raise SpecError(f"policy {name} keeps its cache in a layout ({key}) {KV_FILES[1]} was not exported "
                            "for: export it for this policy")
    quant, stored = spec.get("quant"), flags.get("quant")
    if quant and (quant["bits"], quant["group_size"]) != (stored["bits"], stored["group_size"]):
        raise SpecError(f"kv_quant bits={quant['bits']}, group_size={quant['group_size']}: {KV_FILES[1]} reads a cache "
                        f"packed with bits={stored['bits']}, group_size={stored['group_size']}; export it for this "
                        "storage (the residual may differ)")
    if (probe.grouped or flags.get("head_groups")) and spec != exported:
        raise SpecError(f"policy {name} caches head groups of its own: only the exported policy runs on them")


class OrtKVDecoder(KVDecoder):
    """`KVDecoder` over onnxruntime sessions of `prefill.onnx` / `decode.onnx` in `directory` (an artifact
    saved with `onnx=True`, or a directory `export_kv_onnx` wrote). `spec` overrides the saved policy, where
    the exported graphs report the scores it needs; `providers` and `threads` (intra-op) configure the sessions.

    Used as a model, it hands `prunus.generate` / `prunus.eval` a fresh decoder per sequence (`kv_decoder()`,
    sharing the sessions); called on ids, it returns the logits of their prefill."""

    def __init__(self, directory: str, spec: dict | None = None, *, providers=None, threads: int | None = None,
                 _shared=None):
        if _shared is None:
            _shared = self._open(directory, providers, threads)
        self._shared = directory, _shared
        meta, prefill, decode = _shared
        spec = dict(spec if spec is not None else meta["spec"])
        flags = meta["graphs"]
        _check_compatible(spec, meta["spec"], flags, len(meta["layers"]))
        layers = [KVLayer(**layer) for layer in meta["layers"]]
        self.spec = spec
        self.quant = spec.get("quant")
        self.graph = None
        self.graphs = KVGraphs(prefill, decode, layers, **flags)
        self.policy = make_policy(spec, len(layers))
        self.device = torch.device("cpu")
        self.caches = None
        self.position = 0
        self.logits_index = meta["logits"]

    @staticmethod
    def _open(directory: str, providers, threads):
        paths = [os.path.join(directory, f) for f in KV_FILES]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ArtifactError(f"{directory} lacks {', '.join(os.path.basename(p) for p in missing)}: save a "
                                "kv_cache model with onnx=True (or run export_kv_onnx) to get the KV graphs")
        prefill, decode = (_Session(p, which, providers, threads) for p, which in zip(paths, ("prefill", "decode")))
        return prefill.meta, prefill, decode

    def _logits(self, outputs: list) -> torch.Tensor:
        return outputs[self.logits_index].float()

    def kv_decoder(self) -> OrtKVDecoder:
        """A fresh decoder (empty cache, position 0) over the same sessions and policy."""
        directory, shared = self._shared
        return OrtKVDecoder(directory, self.spec, _shared=shared)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.kv_decoder().feed(ids)
