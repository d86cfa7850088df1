"""Model files: safetensors weights with the resolved recipe and schema in the metadata.

Never pickle: loading a model file cannot execute code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtlcli import __version__
from mtlcli.data.schema import DataSchema
from mtlcli.errors import ArtifactError, MtlError
from mtlcli.fileio import atomic_path, to_json
from mtlcli.models import InputSpec, build_model
from mtlcli.models.blocks import SequenceInput, sparse_embeddings
from mtlcli.recipe import Recipe, recipe_from_dict
from mtlcli.train.loop import LoopState
from mtlcli.weighting.base import WeightingStrategy

if TYPE_CHECKING:
    from mtlcli.objectives.base import TrainingObjective


def input_spec(schema: DataSchema) -> InputSpec:
    index = {f.name: i for i, f in enumerate(schema.categorical)}
    sequences = [
        SequenceInput(
            f.cardinality,
            f.pooling,
            index[f.vocabulary] if f.vocabulary is not None else None,
            index[f.target] if f.target is not None else None,
            f.weights,
        )
        for f in schema.sequences
    ]
    return InputSpec(
        schema.cardinalities,
        len(schema.numeric),
        schema.task_names,
        [t.type for t in schema.tasks],
        sequences,
        categorical_names=[f.name for f in schema.categorical],
        task_spaces=[t.space_task for t in schema.tasks],
    )


def save_model(model: nn.Module, path: Path, recipe: Recipe, schema: DataSchema) -> None:
    """Write weights atomically, with the recipe and schema as JSON metadata."""
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    metadata = {
        "format": "mtlcli-model",
        "mtlcli_version": __version__,
        "torch_version": torch.__version__,
        "recipe": to_json(recipe.to_dict()),
        "schema": to_json(schema.to_dict()),
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


# --- training checkpoints (resume) ---------------------------------------------------------------


class OptimizerState(Protocol):
    """What a checkpoint saves of an optimizer (a run's ``TrainingOptimizer``, or its dense torch
    optimizer alone): the named groups and their state; the row-wise tables' state is read from
    the model's tables."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CHECKPOINT_FORMAT = "mtlcli-checkpoint"
# 2: optimizer state keyed by parameter group name ("optim.<group>.<index in group>.<slot>", the
#    groups' settings in the "optimizer" metadata). 1 (no "checkpoint_version"): one group for the
#    model and the weighting's parameters, keyed by global index; migrated on load.
CHECKPOINT_VERSION = "2"


def optimizer_tensors(optimizer: OptimizerState) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's state as tensors keyed ``optim.<group name>.<index in group>.<slot>``, and
    each group's settings (without its parameters, with its ``size``)."""
    optim = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for position, group in enumerate(optim["param_groups"]):
        name = group.get("name", f"group{position}")
        for local, index in enumerate(group["params"]):
            for slot, value in optim["state"].get(index, {}).items():
                tensors[f"optim.{name}.{local}.{slot}"] = torch.as_tensor(value)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "name": name, "size": len(group["params"])})
    return tensors, groups


def restore_optimizer(
    optimizer: OptimizerState, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path
) -> None:
    """Load the optimizer state of a checkpoint (either version) into ``optimizer``, matched by group name."""
    current = optimizer.state_dict()["param_groups"]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    version = metadata.get("checkpoint_version", "1")
    if version == "1":  # one group over [model..., strategy...]: the same order as the groups now
        order = [index for group in current for index in group["params"]]
        for key, value in tensors.items():
            if key.startswith("optim."):
                index, slot = key[len("optim.") :].split(".", 1)
                slots.setdefault(order[int(index)], {})[slot] = value
        optimizer.load_state_dict({"state": slots, "param_groups": current})
        return
    if version != CHECKPOINT_VERSION:
        raise ArtifactError(
            f"{path}: checkpoint version {version} was written by a newer mtl",
            "resume it with that version, or start the run again with --force",
        )
    saved = {group["name"]: group for group in json.loads(metadata["optimizer"])["groups"]}
    names = [group.get("name", f"group{i}") for i, group in enumerate(current)]
    if sorted(saved) != sorted(names) or any(
        saved[n]["size"] != len(g["params"]) for n, g in zip(names, current, strict=True)
    ):
        raise ArtifactError(
            f"{path}: the checkpoint's optimizer groups ({', '.join(saved)}) do not fit this run's ({', '.join(names)})",
            "start the run again with --force",
        )
    groups = []
    for name, group in zip(names, current, strict=True):
        settings = {k: v for k, v in saved[name].items() if k != "size"}
        groups.append({**settings, "params": group["params"]})
        for key, value in tensors.items():
            if key.startswith(f"optim.{name}."):
                local, slot = key[len(f"optim.{name}.") :].split(".", 1)
                slots.setdefault(group["params"][int(local)], {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": groups})


def save_checkpoint(
    path: Path,
    state: LoopState,
    model: nn.Module,
    optimizer: OptimizerState,
    strategy: WeightingStrategy,
    identity: dict[str, str],
    objective: TrainingObjective | None = None,
) -> None:
    """Everything needed to continue training exactly, as one safetensors file, written atomically.

    Tensors: the model, the optimizer state, the strategy's parameters and state (when it has
    ``state_dict``), the training objective's state (``objective.``), the best weights so far and
    the RNG states. Plain values go in the metadata
    as JSON. ``identity`` (recipe and data hashes) lets ``--resume`` refuse a changed run.
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim, groups = optimizer_tensors(optimizer)
    tensors.update(optim)
    for name, embedding in sparse_embeddings(model):  # the row-wise optimizer of each such table
        for slot, value in embedding.row_state().items():
            tensors[f"rows.{name}.{slot}"] = value
    abilities = strategy.capabilities
    for index, param in enumerate(abilities.parameters):
        tensors[f"strategy_param.{index}"] = param.detach()
    if abilities.state is not None:
        for name, value in abilities.state.state_dict().items():
            tensors[f"strategy.{name}"] = torch.as_tensor(value)
    for name, value in (objective.state_dict() if objective is not None else {}).items():
        tensors[f"objective.{name}"] = value
    for name, value in (state.best_state or {}).items():
        tensors[f"best.{name}"] = value
    for name in ("shuffle_state", "torch_rng", "loss_sum", "weight_sum"):
        value = getattr(state, name)
        if value is not None:
            tensors[f"loop.{name}"] = value
    loop: dict[str, Any] = {
        k: getattr(state, k)
        for k in (
            "epoch",
            "step",
            "epoch_seconds",
            "samples",
            "seconds",
            "history",
            "best_epoch",
            "bad_epochs",
            "stopped_early",
        )
    }
    loop["best_score"] = state.best_score if math.isfinite(state.best_score) else None
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint_version": CHECKPOINT_VERSION,
        "loop": to_json(loop),
        "optimizer": to_json({"class": type(optimizer).__name__, "groups": groups}),
        **identity,
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # from any device
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint_identity(path: Path) -> dict[str, str]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable checkpoint ({exc})", "start the run again with --force") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{path}: not an mtl training checkpoint", "start the run again with --force")
    return metadata


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: OptimizerState,
    strategy: WeightingStrategy,
    objective: TrainingObjective | None = None,
) -> LoopState:
    """Restore model, optimizer, strategy and training objective in place from a checkpoint;
    return the loop state."""
    metadata = read_checkpoint_identity(path)
    try:
        tensors = load_file(str(path))
        loop = json.loads(metadata["loop"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{path}: damaged checkpoint ({exc!r})", "start the run again with --force") from None

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(part("model."), strict=True)
        if objective is not None:  # before the optimizer, whose groups it sizes
            objective.load_state_dict(part("objective."))
        restore_optimizer(optimizer, tensors, metadata, path)
        for name, embedding in sparse_embeddings(model):
            embedding.load_row_state(part(f"rows.{name}."))
        with torch.no_grad():
            for position, param in enumerate(strategy.capabilities.parameters):
                param.copy_(tensors[f"strategy_param.{position}"])
        state = strategy.capabilities.state
        if state is not None:
            state.load_state_dict(part("strategy."))
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ArtifactError(
            f"{path}: the checkpoint does not fit this run's model ({first})", "start the run again with --force"
        ) from None
    loop_tensors = part("loop.")
    best = part("best.")
    return LoopState(
        epoch=int(loop["epoch"]),
        step=int(loop["step"]),
        shuffle_state=loop_tensors.get("shuffle_state"),
        torch_rng=loop_tensors.get("torch_rng"),
        loss_sum=loop_tensors.get("loss_sum"),
        weight_sum=loop_tensors.get("weight_sum"),
        epoch_seconds=float(loop["epoch_seconds"]),
        samples=int(loop["samples"]),
        seconds=float(loop["seconds"]),
        history=list(loop["history"]),
        best_score=-math.inf if loop["best_score"] is None else float(loop["best_score"]),
        best_epoch=int(loop["best_epoch"]),
        bad_epochs=int(loop["bad_epochs"]),
        best_state=best or None,
        stopped_early=bool(loop["stopped_early"]),
    )
