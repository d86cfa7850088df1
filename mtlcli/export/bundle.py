"""Self-contained bundles: model.safetensors (recipe and schema embedded), recipe.yaml,
schema.json and manifest.json (file names, sha256, versions). Enough to rebuild the model
without the run directory or the training data."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from mtlcli import __version__
from mtlcli.errors import ArtifactError
from mtlcli.fileio import atomic_dir, sha256_file, write_json, write_text
from mtlcli.recipe import recipe_to_yaml
from mtlcli.train.checkpoint import LoadedModel, load_model, save_model
from mtlcli.train.run import load_run

BUNDLE_FILES = ("model.safetensors", "recipe.yaml", "schema.json")


def export_bundle(run_dir: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Write the bundle for a run into ``out`` (atomically). Returns the manifest."""
    loaded = load_run(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ArtifactError(f"{out}: exists and is not empty", "choose another --out, or pass --force")
        if not (out / "manifest.json").is_file():
            raise ArtifactError(
                f"{out}: --force only replaces an mtl bundle, and this is not one", "choose another --out"
            )
    with atomic_dir(out) as tmp:
        save_model(loaded.model, tmp / "model.safetensors", loaded.recipe, loaded.schema)
        write_text(tmp / "recipe.yaml", recipe_to_yaml(loaded.recipe))
        loaded.schema.save(tmp / "schema.json")
        manifest = {
            "format": "mtlcli-bundle",
            "version": 1,
            "mtlcli_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "scheme": loaded.recipe.model.scheme,
            "tasks": loaded.schema.task_names,
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in BUNDLE_FILES
            },
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_bundle(bundle: Path) -> LoadedModel:
    """Rebuild the model of a bundle, after checking every file against the manifest's sha256."""
    manifest_file = bundle / "manifest.json"
    if not manifest_file.is_file():
        raise ArtifactError(
            f"{bundle}: not an mtl bundle (no manifest.json)", "give a directory written by `mtl export`"
        )
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_file}: damaged manifest ({exc!r})", "re-export the bundle") from None
    for name in BUNDLE_FILES:
        path = bundle / name
        if not path.is_file():
            raise ArtifactError(f"{bundle}: {name} is missing", "re-export the bundle")
        if name not in files or sha256_file(path) != files[name].get("sha256"):
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest (changed or truncated)", "re-export the bundle"
            )
    return load_model(bundle / "model.safetensors")
