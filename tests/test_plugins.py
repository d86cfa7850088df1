"""A new component needs no edit anywhere else: a toy scheme with gates, registered for these tests
only, trains, is explained (its gates over its own named experts), exports to ONNX and predicts,
and passes the model contract tests; components also arrive from installed packages through
entry points."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mtlcli.models import SCHEMES
from mtlcli.registry_loader import WEIGHTING_PLUGINS, load_plugins
from mtlcli.weighting import WEIGHTINGS
from tests.helpers import invoke
from tests.models import test_models as contract
from tests.test_bad_inputs import GOOD, good_data

TOY_SCHEME = textwrap.dedent(
    '''
    """A toy gated scheme: two experts ("wide", "narrow"), one softmax gate per task over them."""

    import torch
    from pydantic import PositiveInt
    from torch import Tensor, nn

    from mtlcli.data.batch import Batch
    from mtlcli.models.base import Capabilities, InputSpec, ModelParams, register_scheme
    from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation
    from mtlcli.models.blocks import FeatureEmbedding, Towers


    class ToyParams(ModelParams):
        units: PositiveInt = 6


    class ToyGates(nn.Module):
        EXPERTS = ["wide", "narrow"]

        def __init__(self, inputs: InputSpec, embedding_dim: int, units: int) -> None:
            super().__init__()
            self.tasks = list(inputs.tasks)
            self.embedding = FeatureEmbedding(inputs.cardinalities, inputs.n_numeric, embedding_dim)
            width = self.embedding.out_dim
            self.experts = nn.ModuleList([nn.Linear(width, units), nn.Linear(width, units)])
            self.gates = nn.ModuleDict({t: nn.Linear(width, 2) for t in self.tasks})
            self.towers = Towers(self.tasks, units, [], 0.0)
            self.z = SharedRepresentation()

        @property
        def capabilities(self) -> Capabilities:
            return Capabilities(shared_representation=self.z)

        def forward(self, batch: Batch) -> Tensor:
            x = self.embedding(batch)
            experts = torch.stack([torch.relu(e(x)) for e in self.experts], dim=1)  # [B, 2, H]
            x_gates = self.z.alias(x)
            self.z.keep(x_gates, experts)
            mixed = [(torch.softmax(self.gates[t](x_gates), -1).unsqueeze(-1) * experts).sum(1) for t in self.tasks]
            return self.towers(mixed)

        def introspect(self, batch: Batch) -> Introspection:
            x = self.embedding(batch)
            return Introspection(
                [GateRecord("gate", t, torch.softmax(self.gates[t](x), -1), list(self.EXPERTS)) for t in self.tasks]
            )

        def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
            groups: dict[str, dict[str, nn.Parameter]] = {"shared": {}, **{t: {} for t in self.tasks}}
            for name, param in self.named_parameters():
                owner = next((t for t in self.tasks if name.startswith((f"gates.{t}.", f"towers.nets.{t}."))), "shared")
                groups[owner][name] = param
            return groups

        def last_shared_layer(self) -> list[Tensor]:
            return [e.weight for e in self.experts]


    @register_scheme("toy_gates", ToyParams, "a toy: two named experts, one gate per task")
    def build(params: ToyParams, inputs: InputSpec) -> ToyGates:
        return ToyGates(inputs, params.embedding_dim, params.units)
    '''
)


@pytest.fixture
def toy_scheme(tmp_path: Path) -> Iterator[str]:
    """Register the toy scheme for one test, and remove it afterwards."""
    (tmp_path / "mtl_toy_scheme.py").write_text(TOY_SCHEME)
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("mtl_toy_scheme")
        yield "toy_gates"
    finally:
        SCHEMES.remove("toy_gates")
        sys.modules.pop("mtl_toy_scheme", None)
        sys.path.remove(str(tmp_path))


def test_the_contract_tests_cover_a_new_scheme(toy_scheme: str) -> None:
    contract.test_one_output_per_task(toy_scheme)
    contract.test_parameter_groups_cover_every_parameter_once(toy_scheme)
    contract.test_introspection_gives_gates_that_sum_to_one_and_square_alphas(toy_scheme)
    contract.test_gradients_reach_every_parameter(toy_scheme)
    contract.test_task_parameters_get_no_gradient_from_other_tasks(toy_scheme)
    contract.test_same_seed_same_model(toy_scheme)
    contract.test_shared_representation_cuts_shared_from_task_parameters(toy_scheme, contract.build(toy_scheme))
    contract.test_last_shared_layer_is_shared_and_every_task_reaches_it(toy_scheme, contract.build(toy_scheme))


def test_a_new_gated_scheme_trains_explains_exports_and_predicts(
    toy_scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text(good_data())
    recipe = {**GOOD, "model": {"scheme": toy_scheme, "embedding_dim": 2, "units": 4}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    trained = invoke("train", "recipe.yaml", "--out", "run", "--quiet")
    assert trained.exit_code == 0, trained.output
    explained = invoke("explain", "run", "--json")
    assert explained.exit_code == 0, explained.output
    gates = json.loads(explained.stdout)["gates"]
    assert gates["gate"]["experts"] == ["wide", "narrow"]  # the scheme's own names for its experts
    assert set(gates["gate"]["weights"]) == {"click", "buy"}
    exported = invoke("export", "run", "--out", "bundle", "--format", "onnx")
    assert exported.exit_code == 0, exported.output
    for engine in ("torch", "onnxruntime"):
        scored = invoke("predict", "bundle", "--input", "data.csv", "--engine", engine)
        assert scored.exit_code == 0, scored.output
        assert scored.stdout.splitlines()[0] == "click,buy" and len(scored.stdout.splitlines()) == 81


TOY_PLUGIN = textwrap.dedent(
    '''
    """A weighting from an installed package: half the weight on every task."""

    import torch

    from mtlcli.weighting.base import FixedWeights, WeightingParams, register_weighting


    class HalfParams(WeightingParams):
        pass


    @register_weighting("toy_half", HalfParams, "every task at weight 0.5 (a plugin)")
    def build(params: HalfParams, tasks: list[str]) -> FixedWeights:
        return FixedWeights(torch.full((len(tasks),), 0.5))
    '''
)


def test_an_installed_package_adds_a_weighting_through_its_entry_point(tmp_path: Path) -> None:
    """A package on the path with entry-point metadata (as pip installs it), no network."""
    (tmp_path / "mtl_toy_plugin.py").write_text(TOY_PLUGIN)
    info = tmp_path / "mtl_toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mtl-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{WEIGHTING_PLUGINS}]\ntoy_half = mtl_toy_plugin\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert "toy_half" not in WEIGHTINGS
        assert load_plugins(WEIGHTING_PLUGINS) == ["toy_half"]
        assert "toy_half" in WEIGHTINGS
        assert WEIGHTINGS.get("toy_half").summary == "every task at weight 0.5 (a plugin)"
    finally:
        if "toy_half" in WEIGHTINGS:
            WEIGHTINGS.remove("toy_half")
        sys.modules.pop("mtl_toy_plugin", None)
        sys.path.remove(str(tmp_path))
