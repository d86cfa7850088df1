"""Self-contained bundles: model.safetensors (recipe and schema embedded), recipe.yaml,
schema.json and manifest.json (file names, sha256, versions). Enough to rebuild the model
without the run directory or the training data."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from mtlcli import __version__
from mtlcli.errors import ArtifactError, MtlError
from mtlcli.fileio import atomic_dir, sha256_file, write_json, write_text
from mtlcli.numerics import kernel_scale, kernel_tolerance
from mtlcli.recipe import recipe_to_yaml
from mtlcli.train.checkpoint import LoadedModel, load_model, save_model
from mtlcli.train.run import load_run

BUNDLE_FILES = ("model.safetensors", "recipe.yaml", "schema.json")
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
FORMATS = ("safetensors", "onnx")
BUNDLE_FORMAT, BUNDLE_VERSION = "mtlcli-bundle", 1


def export_bundle(run_dir: Path, out: Path, force: bool = False, fmt: str = "safetensors") -> dict[str, Any]:
    """Write the bundle for a run into ``out`` (atomically). Returns the manifest.

    ``fmt="onnx"`` adds model.onnx, exported from the same weights and checked against PyTorch;
    the bundle is not written when the two disagree.
    """
    if fmt not in FORMATS:
        raise MtlError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    loaded = load_run(run_dir)
    if fmt == "onnx":
        _require_onnx()
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
        names = list(BUNDLE_FILES)
        onnx_info: dict[str, Any] = {}
        if fmt == "onnx":
            onnx_info = export_onnx(loaded.model, loaded.schema, tmp / ONNX_FILE, external_bytes=EXTERNAL_BYTES)
            names.append(ONNX_FILE)
            if onnx_info["external_data"]:
                names.append(onnx_info["external_data"])
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "mtlcli_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "scheme": loaded.recipe.model.scheme,
            "tasks": loaded.schema.task_names,
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names
            },
        }
        if onnx_info:
            manifest["onnx"] = onnx_info
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_bundle(bundle: Path) -> LoadedModel:
    """Rebuild the model of a bundle, after checking every file against the manifest's sha256."""
    manifest_file = bundle / "manifest.json"
    if not manifest_file.is_file():
        if (bundle / "summary.json").is_file() and (bundle / "model.safetensors").is_file():
            raise ArtifactError(
                f"{bundle}: a training run, not a bundle",
                f"export it first: mtl export {bundle} --out bundles/{bundle.name}",
            )
        raise ArtifactError(
            f"{bundle}: not an mtl bundle (no manifest.json)", "give a directory written by `mtl export`"
        )
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_file}: damaged manifest ({exc!r})", "re-export the bundle") from None
    if not isinstance(files, dict):
        raise ArtifactError(f"{manifest_file}: damaged manifest (no file list)", "re-export the bundle")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(
            f"{manifest_file}: format {manifest.get('format')!r} is not {BUNDLE_FORMAT!r}",
            "give a directory written by `mtl export`, or re-export the bundle",
        )
    if manifest.get("version") != BUNDLE_VERSION:
        newer = isinstance(manifest.get("version"), int) and manifest["version"] > BUNDLE_VERSION
        raise ArtifactError(
            f"{manifest_file}: bundle version {manifest.get('version')!r} is not {BUNDLE_VERSION}"
            + (" (written by a newer mtl)" if newer else ""),
            "use the mtl that wrote it, or re-export the bundle with this one",
        )
    for name in dict.fromkeys([*BUNDLE_FILES, *files]):
        path = bundle / name
        if Path(name).name != name:
            raise ArtifactError(f"{manifest_file}: damaged manifest (file name {name!r})", "re-export the bundle")
        if not path.is_file():
            raise ArtifactError(f"{bundle}: {name} is missing", "re-export the bundle")
        entry = files.get(name)
        if not isinstance(entry, dict) or sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest (changed or truncated)", "re-export the bundle"
            )
    return load_model(bundle / "model.safetensors")


def is_bundle(path: Path) -> bool:
    return (path / "manifest.json").is_file()


# --- ONNX ---------------------------------------------------------------------------------------


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise MtlError(
            f"ONNX needs the optional packages onnx and onnxruntime ({exc.name} is not installed)",
            "pip install 'mtlcli[onnx]'",
        ) from None


def _onnx_samples(schema: Any, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Encoded inputs covering every id of every categorical feature, normal numeric values, and
    (when the model reads behaviour histories) histories of every length with ids in range."""
    generator = torch.Generator().manual_seed(seed)
    cards = torch.tensor(schema.cardinalities, dtype=torch.float64)
    uniform = torch.rand((rows, len(schema.categorical)), generator=generator, dtype=torch.float64)
    categorical = (uniform * cards).long()
    numeric = torch.randn((rows, len(schema.numeric)), generator=generator)
    sequences = schema.sequences
    if not sequences:
        return categorical, numeric
    index = {f.name: i for i, f in enumerate(schema.categorical)}
    longest = max(f.max_len for f in sequences)
    sizes = torch.tensor(
        [schema.cardinalities[index[f.vocabulary]] if f.vocabulary else f.cardinality for f in sequences],
        dtype=torch.float64,
    ).view(1, -1, 1)
    ids = (torch.rand((rows, len(sequences), longest), generator=generator, dtype=torch.float64) * sizes).long()
    caps = torch.tensor([f.max_len for f in sequences]).view(1, -1)
    lengths = (torch.rand((rows, len(sequences)), generator=generator) * (caps + 1)).long().clamp_max(caps)
    return categorical, numeric, ids, lengths


ONNX_DATA = "model.onnx.data"  # the weights of a large model.onnx (ONNX external data)
# A model whose weights pass this many bytes keeps them in ONNX_DATA: a protobuf file cannot pass
# 2 GiB, and a 10M-row table of dimension 16 alone is 640 MB (with Adam's moments three times that
# in a checkpoint, but only the weights are exported).
EXTERNAL_BYTES = 1 << 30


def export_onnx(
    model: torch.nn.Module, schema: Any, path: Path, check_rows: int = 4096, external_bytes: int = EXTERNAL_BYTES
) -> dict[str, Any]:
    """Export ``model`` to ONNX with inputs (categorical int64 [B, F_cat], numeric float32 [B, F_num])
    and output logits float32 [B, T], B dynamic; then run onnxruntime against PyTorch on sample rows
    (several batch sizes) and raise if any output differs by more than the kernel bound of
    ``mtlcli.numerics`` (K_OUTPUTS·eps32 at the outputs' scale, at least 1): ONNX Runtime runs its
    own kernels, so the last bits differ, but never by more than another CPU's would.

    Uses the TorchScript exporter (``dynamo=False``): the torch.export one needs onnxscript and
    takes seconds where this takes well under one. A model whose weights pass ``external_bytes``
    is saved with its weights in one external-data file, ``ONNX_DATA``, beside ``path``
    (onnxruntime reads it from there); ``external_data`` in the result names it, or is None.
    """
    import tempfile
    import warnings

    import onnx
    import onnxruntime

    from mtlcli.export.predict import BatchInputs

    wrapped = BatchInputs(model, len(schema.tasks)).eval()
    example = _onnx_samples(schema, 8)
    names = ["categorical", "numeric", "sequences", "sequence_lengths"][: len(example)]
    scratch = Path(tempfile.mkdtemp(prefix=".onnx-", dir=path.parent))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapped,
                example,
                str(scratch / path.name),
                dynamo=False,
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**{name: {0: "batch"} for name in names}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
            )
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:  # e.g. an operator ONNX lacks
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(
                f"cannot export this model to ONNX: {first}",
                "the bundle was not written; export without --format onnx, or report the model's scheme",
            ) from None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    external = ONNX_DATA if weights > external_bytes else None
    try:  # saved again, so that a large model's weights are one file with a known name
        proto = onnx.load(str(scratch / path.name))
        if external is None:
            onnx.save_model(proto, str(path))
        else:
            onnx.save_model(
                proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external
            )
            (path.parent / external).chmod(path.stat().st_mode)  # onnx creates it private
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    session = onnx_session(path)
    worst, tolerance = 0.0, 0.0
    for rows in (1, 7, check_rows):
        sample = _onnx_samples(schema, rows, seed=rows)
        with torch.no_grad():
            expected = wrapped(*sample)
        got = session.run(None, {name: value.numpy() for name, value in zip(names, sample, strict=True)})[0]
        worst = max(worst, float((torch.from_numpy(got) - expected).abs().max()))
        tolerance = max(tolerance, kernel_tolerance(kernel_scale(expected, floor=1.0)))
    if not worst <= tolerance:
        raise ArtifactError(
            f"the ONNX model's outputs differ from PyTorch's by up to {worst:.3g} (> {tolerance:.3g})",
            "the bundle was not written; export without --format onnx, or report the model's scheme",
        )
    return {
        "opset": ONNX_OPSET,
        "onnxruntime_version": onnxruntime.__version__,
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "external_data": external,
    }


def onnx_session(path: Path) -> Any:
    """An onnxruntime session (CPU) for a model.onnx."""
    _require_onnx()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({exc})", "re-export the bundle") from None


def bundle_onnx_session(bundle: Path) -> Any:
    """The onnxruntime session of a bundle exported with --format onnx (call load_bundle first: it checks sha256)."""
    try:
        listed = ONNX_FILE in json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = False
    if not listed or not (bundle / ONNX_FILE).is_file():
        raise ArtifactError(f"{bundle}: has no {ONNX_FILE}", "export it with `mtl export RUN --out B --format onnx`")
    return onnx_session(bundle / ONNX_FILE)
