"""Post-processing shared by the exporters: node names as paths, named dynamic axes, saving."""

from __future__ import annotations

from pathlib import Path

PROTOBUF_LIMIT = 2**31 - 1  # a single ModelProto cannot exceed 2 GB: weights go to external data above it


def rename_nodes_by_scope(model_proto, prefix: str) -> None:
    """ONNX node names become paths from the torch module scopes (/vision/apet/topk_3), so profiles,
    Polygraphy and TensorRT layer names say where an op came from."""
    seen: set[str] = set()
    for node in model_proto.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        # "['', 'tower', 'tower.model.model.vision_tower', 'conv2d']": module paths, then the fx node name
        parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        parts = [p for p in parts if p and not p.startswith("_empty_nn_module_stack")]
        module = parts[-2].replace("model.model.", "").replace(".", "/") if len(parts) > 1 else ""
        leaf = parts[-1] if parts else node.op_type
        name = "/".join(filter(None, [prefix, module, leaf]))
        if name in seen:  # one torch op decomposed into several ONNX nodes
            name = f"{name}/{node.op_type}"
            suffix = 0
            while f"{name}_{suffix}" in seen:
                suffix += 1
            name = f"{name}_{suffix}"
        seen.add(name)
        node.name = name


def name_dynamic_axes(model_proto, inputs_spec, outputs_spec) -> None:
    """Give every dynamic axis of the graph I/O the name the manifest uses ('batch', 'keep', ...)."""
    specs = {s.name: s for s in (*inputs_spec, *outputs_spec)}
    for value in (*model_proto.graph.input, *model_proto.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis < len(spec.shape) and isinstance(spec.shape[axis], str) and not dim.HasField("dim_value"):
                dim.dim_param = spec.shape[axis]


def save_model(model_proto, path: Path, external_data_above: int = PROTOBUF_LIMIT) -> None:
    """Write path; weights go to path.name + '.data' beside it when the model is larger than the limit."""
    import onnx

    external = model_proto.ByteSize() > external_data_above
    onnx.save_model(
        model_proto, str(path), save_as_external_data=external,
        all_tensors_to_one_file=True, location=f"{Path(path).name}.data" if external else None,
    )


def finish_and_save(model_proto, path: Path, prefix: str, inputs_spec, outputs_spec) -> None:
    rename_nodes_by_scope(model_proto, prefix)
    name_dynamic_axes(model_proto, inputs_spec, outputs_spec)
    save_model(model_proto, path)
