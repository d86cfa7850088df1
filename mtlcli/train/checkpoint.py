"""Model files: safetensors weights with the resolved recipe and schema in the metadata.

Never pickle: loading a model file cannot execute code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtlcli import __version__
from mtlcli.data.schema import DataSchema
from mtlcli.errors import ArtifactError, MtlError
from mtlcli.fileio import atomic_path
from mtlcli.models import InputSpec, build_model
from mtlcli.recipe import Recipe, recipe_from_dict


def input_spec(schema: DataSchema) -> InputSpec:
    return InputSpec(schema.cardinalities, len(schema.numeric), schema.task_names, [t.type for t in schema.tasks])


def save_model(model: nn.Module, path: Path, recipe: Recipe, schema: DataSchema) -> None:
    """Write weights atomically, with the recipe and schema as JSON metadata."""
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    metadata = {
        "format": "mtlcli-model",
        "mtlcli_version": __version__,
        "torch_version": torch.__version__,
        "recipe": json.dumps(recipe.to_dict()),
        "schema": json.dumps(schema.to_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@dataclass(frozen=True)
class LoadedModel:
    recipe: Recipe
    schema: DataSchema
    model: nn.Module


def load_model(path: Path) -> LoadedModel:
    """Rebuild a model from a model file alone (weights + recipe + schema); eval mode."""
    if not path.is_file():
        raise ArtifactError(f"{path}: model file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({exc})", "the file is corrupt or truncated; retrain or re-export"
        ) from None
    if metadata.get("format") != "mtlcli-model":
        raise ArtifactError(f"{path}: a safetensors file, but not an mtl model (no mtl metadata)")
    try:
        recipe = recipe_from_dict(json.loads(metadata["recipe"]), f"{path} (embedded recipe)")
        schema = DataSchema.from_dict(json.loads(metadata["schema"]), f"{path} (embedded schema)")
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: damaged metadata ({exc!r})") from None
    except MtlError as exc:
        raise ArtifactError(f"{path}: the embedded recipe is not valid: {exc.message}") from None
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ArtifactError(f"{path}: weights do not fit the model its recipe describes ({first})") from None
    model.eval()
    return LoadedModel(recipe, schema, model)
