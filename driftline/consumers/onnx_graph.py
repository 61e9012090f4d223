"""Graph editing for embeddings: expose any intermediate tensor as the model's only output.

With the ``onnx`` package only; the embedder loads the bytes :func:`expose_tensor` returns.
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path

import onnx
import onnx.utils
from google.protobuf.message import DecodeError


class ModelFileError(ValueError):
    """A model path that names no usable ONNX model: missing, a directory, unreadable, or
    not an ONNX model (not its protobuf, or a graph without nodes or outputs)."""


def load_model(path: Path) -> onnx.ModelProto:
    """The ONNX model at ``path``; :class:`ModelFileError` naming it and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"not an ONNX model: {path} (a directory)")
    try:
        model = onnx.load(str(path))
    except DecodeError:
        raise ModelFileError(f"not an ONNX model: {path} (not an ONNX protobuf)") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the model {path}: {exc.strerror or exc}") from None
    if not model.graph.node or not model.graph.output:  # protobuf decodes 0 bytes as empty
        why = "an empty file" if path.stat().st_size == 0 else "its graph has no nodes or outputs"
        raise ModelFileError(f"not an ONNX model: {path} ({why})")
    return model


def expose_tensor(path: Path, name: str | None) -> tuple[bytes, str]:
    """Serialised model whose only output is ``name`` (a graph output or intermediate tensor).

    The graph is cut to the nodes that ``name`` depends on, so an early layer costs only the
    layers before it. Returns ``(model bytes, output name)``; :class:`ModelFileError` when
    ``path`` is no ONNX model.
    """
    model = load_model(path)
    graph = model.graph
    outputs = [o.name for o in graph.output]
    name = name or outputs[0]
    if outputs == [name]:
        return model.SerializeToString(), name
    produced = {t for node in graph.node for t in node.output}
    if name not in produced:
        raise ValueError(f"tensor {name!r} is not produced by any node; close matches: "
                         f"{get_close_matches(name, sorted(produced), n=8, cutoff=0.3)}")
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    if name not in known:  # shape inference could not type it: declare it as float, shape free
        inferred.graph.value_info.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    initialisers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initialisers]
    try:
        cut = onnx.utils.Extractor(inferred).extract_model(inputs, [name])
    except Exception:  # noqa: BLE001 - e.g. control-flow subgraphs: fall back to no pruning
        vi = next(v for v in inferred.graph.value_info if v.name == name)
        del inferred.graph.output[:]
        inferred.graph.output.append(vi)
        cut = inferred
    return cut.SerializeToString(), name


def list_tensors(path: Path) -> list[tuple[str, list[int | str | None]]]:
    """Every named tensor a node produces, with its inferred shape (to choose a layer)."""
    model = onnx.shape_inference.infer_shapes(load_model(path))
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                        for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.output]}
    return [(t, shapes.get(t, [])) for node in model.graph.node for t in node.output if t]
