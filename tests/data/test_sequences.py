"""Behaviour histories as features: encoding (most recent first, shared or own vocabulary),
pooling (mean, sum, DIN attention) in every scheme, and the errors around them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
import yaml

from mtlcli.data.batch import Batch, SplitTensors
from mtlcli.data.schema import FIRST_ID, OOV_ID
from mtlcli.data.store import Prepared, prepare
from mtlcli.errors import DataError
from mtlcli.models import SCHEMES, InputSpec, blocks, build_model
from mtlcli.models.blocks import FeatureEmbedding, SequenceInput, sparse_embeddings, use_sparse_rows
from mtlcli.recipe import recipe_from_text
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.loop import NullObserver, fit, task_losses
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.numerics import assert_kernel_close

ITEMS = ["a", "b", "c", "a", "b", "d", "a", "c"]
HISTORIES: list[list[str] | None] = [["a", "b"], [], None, ["c", "a", "b", "z"], ["b"], ["a"], ["b", "b"], ["d", "c"]]
TAGS = ["x|y", "", None, "y", "x|x|y", "q", "y", "x"]


def recipe_for(tmp_path: Path, source: Path, sequences: dict[str, Any], extra: dict[str, Any] | None = None) -> Any:
    recipe = {
        "data": {"source": str(source), "split": {"by": "modulo", "modulus": 4, "test": [0], "valid": [1]},
                 "cache_dir": str(tmp_path / "cache")},
        "features": {"categorical": ["item"], "sequences": sequences},
        "tasks": {"click": {"label": "click"}},
        **(extra or {}),
    }  # fmt: skip
    return recipe_from_text(yaml.safe_dump(recipe, sort_keys=False), "test-recipe")


def parquet(tmp_path: Path, rows: int = 1) -> Path:
    pl.DataFrame(
        {"item": ITEMS * rows, "hist": HISTORIES * rows, "tags": TAGS * rows, "click": [1, 0, 1, 0, 1, 0, 0, 1] * rows}
    ).write_parquet(tmp_path / "d.parquet")
    return tmp_path / "d.parquet"


def encoded(prepared: Prepared, split: str, name: str) -> list[list[int]]:
    return prepared.file(split).histories(name)


def test_histories_are_encoded_most_recent_first_in_the_shared_vocabulary(tmp_path: Path) -> None:
    prepared = prepare(recipe_for(tmp_path, parquet(tmp_path), {"hist": {"vocabulary": "item", "max_len": 3}}))
    vocab = prepared.schema.categorical[0].vocab  # train rows 2, 3, 6, 7: c, a, a, c
    ids = {v: FIRST_ID + i for i, v in enumerate(vocab)}
    # train rows in order: None, [c a b z], [b b], [d c]; the last three ids, most recent first
    assert encoded(prepared, "train", "hist") == [
        [],
        [OOV_ID, ids.get("b", OOV_ID), ids["a"]],
        [ids.get("b", OOV_ID)] * 2,
        [ids["c"], ids.get("d", OOV_ID)],
    ]
    item_ids = pl.read_parquet(prepared.directory / "train.parquet").get_column("item").to_list()
    assert item_ids[1] == ids["a"], "the history's ids are the candidate feature's ids"


def test_text_histories_have_their_own_vocabulary_fitted_on_train(tmp_path: Path) -> None:
    source = tmp_path / "d.csv"
    pl.DataFrame({"item": ITEMS, "tags": TAGS, "click": [1, 0, 1, 0, 1, 0, 0, 1]}).write_csv(source)
    prepared = prepare(recipe_for(tmp_path, source, {"tags": {"max_len": 2, "pooling": "sum"}}))
    feature = prepared.schema.sequences[0]
    assert feature.vocabulary is None and feature.vocab == ["y", "x"]  # train rows 2, 3, 6, 7: -, y, y, x
    x, y = FIRST_ID + 1, FIRST_ID
    assert encoded(prepared, "train", "tags") == [[], [y], [y], [x]]
    assert encoded(prepared, "valid", "tags") == [[], [OOV_ID]]  # rows 1 ('': none) and 5 ('q': unseen)
    tensors = prepared.load("train")
    assert tensors.history_ids is not None and tensors.sequence_lengths is not None
    assert tensors.sequence_lengths[:, 0].tolist() == [0, 1, 1, 1]
    assert tensors.history_ids.tolist() == [y, y, x]  # held packed: the ids present only
    padded = tensors.padded().sequences
    assert padded is not None and padded[:, 0].tolist() == [[0], [y], [y], [x]]


# one mixed history per row with parallel behaviour types and timestamps, and the row's own time
MIXED: list[tuple[str, list[str] | None, list[str] | None, list[int] | None, int]] = [
    ("a", ["a", "b", "c"], ["v", "b", "v"], [1, 2, 3], 3),
    ("b", ["c", "d"], ["b", "v"], [1, 1], 2),
    ("c", ["d", "b", "c", "e"], ["v", "v", "b", "v"], [0, 5, 5, 9], 6),
    ("d", [], [], [], 1),
    ("e", None, None, None, 4),
    ("a", ["b"], ["v"], [7], 7),  # an event at the row's own time counts as later
    ("b", ["c", "c", "b"], ["v", "v", "v"], [1, 2, 3], 10),
    ("c", ["d", "", "b"], ["v", "v", "v"], [1, 2, 3], 10),  # an empty id is dropped
]
SPLIT_ROWS = {"test": [0, 4], "valid": [1, 5], "train": [2, 3, 6, 7]}


def mixed_source(tmp_path: Path, form: str) -> Path:
    frame = pl.DataFrame(
        {
            "item": [r[0] for r in MIXED],
            "hist": [r[1] for r in MIXED],
            "kinds": [r[2] for r in MIXED],
            "times": [r[3] for r in MIXED],
            "t": [r[4] for r in MIXED],
            "click": [1, 0, 1, 0, 1, 0, 0, 1],
        }
    )
    if form == "parquet":
        frame.write_parquet(tmp_path / "m.parquet")
        return tmp_path / "m.parquet"
    lists = ["hist", "kinds", "times"]
    frame.with_columns(pl.col(c).cast(pl.List(pl.String)).list.join("|") for c in lists).write_csv(tmp_path / "m.csv")
    return tmp_path / "m.csv"


def kept(row: int, types: list[str], before: bool) -> list[str]:
    """The brute force: the ids of ``types`` (and strictly before the row's time), oldest first."""
    _, ids, kinds, times, t = MIXED[row]
    return [
        x
        for x, kind, time in zip(ids or [], kinds or [], times or [], strict=True)
        if x and kind in types and (not before or time < t)
    ]


@pytest.mark.parametrize("form", ["parquet", "csv"])
@pytest.mark.parametrize("before", [True, False])
def test_parallel_types_and_times_keep_the_right_ids(tmp_path: Path, form: str, before: bool) -> None:
    options = {"vocabulary": "item", "max_len": 2, "type_column": "kinds", "types": ["v"], "time_column": "times"}
    recipe = recipe_for(
        tmp_path, mixed_source(tmp_path, form), {"hist": options | ({"row_time": "t"} if before else {})}
    )
    prepared = prepare(recipe)
    vocab = prepared.schema.categorical[0].vocab
    for split, rows in SPLIT_ROWS.items():
        expected = [
            [FIRST_ID + vocab.index(x) if x in vocab else OOV_ID for x in reversed(kept(r, ["v"], before))][:2]
            for r in rows
        ]
        assert encoded(prepared, split, "hist") == expected, split


def test_an_own_vocabulary_is_fitted_on_the_kept_ids_only(tmp_path: Path) -> None:
    options = {"type_column": "kinds", "types": ["v"], "time_column": "times", "row_time": "t", "pooling": "sum"}
    prepared = prepare(recipe_for(tmp_path, mixed_source(tmp_path, "parquet"), {"hist": options}))
    # train rows 2, 3, 6, 7 keep [d b], [], [c c b], [d b]; 'e' (row 2) is at time 9, after the row's 6
    assert prepared.schema.sequences[0].vocab == ["b", "c", "d"]


@pytest.mark.parametrize("form", ["parquet", "csv"])
def test_serving_keeps_the_same_ids_from_parallel_lists(tmp_path: Path, form: str) -> None:
    """`mtl predict`'s encoding of raw rows with types, timestamps and row times gives the ids
    preprocessing wrote, and checks the lists as preprocessing does."""
    from mtlcli.export.predict import encode_inputs

    options = {"vocabulary": "item", "max_len": 3, "type_column": "kinds", "types": ["v"], "time_column": "times",
               "row_time": "t"}  # fmt: skip
    source = mixed_source(tmp_path, form)
    prepared = prepare(recipe_for(tmp_path, source, {"hist": options}))
    raw = pl.read_parquet(source) if form == "parquet" else pl.read_csv(source)
    test = raw[SPLIT_ROWS["test"]]
    inputs = encode_inputs(test, prepared.schema)
    stored = prepared.load("test").padded()
    assert stored.sequences is not None and stored.sequence_lengths is not None
    width = stored.sequences.shape[2]
    assert torch.equal(inputs["sequence_lengths"], stored.sequence_lengths)
    assert torch.equal(inputs["sequences"][..., :width], stored.sequences)
    assert not inputs["sequences"][..., width:].any()
    shifted = (
        test.with_columns(pl.col("kinds").reverse()) if form == "parquet" else test.with_columns(kinds=pl.lit("v"))
    )
    with pytest.raises(DataError, match=r"input column 'kinds': column 'kinds' has (0 types|1 type) for 3 ids"):
        encode_inputs(shifted, prepared.schema)


def embedding_with(sequences: list[SequenceInput], dim: int = 4) -> FeatureEmbedding:
    torch.manual_seed(0)
    return FeatureEmbedding([6], 1, dim, sequences)


def batch(ids: list[list[int]], lengths: list[int], candidate: list[int]) -> Batch:
    n = len(ids)
    return Batch(
        torch.tensor(candidate).view(n, 1),
        torch.zeros(n, 1),
        torch.zeros(n, 1),
        torch.ones(n, 1, dtype=torch.bool),
        sequences=torch.tensor(ids).view(n, 1, -1),
        sequence_lengths=torch.tensor(lengths).view(n, 1),
    )


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_mean_and_sum_pooling_by_hand(pooling: str) -> None:
    embedding = embedding_with([SequenceInput(6, pooling, shares=0)])
    table = embedding.table.weight.detach()
    out = embedding(batch([[2, 3, 5], [4, 0, 0]], [3, 1], [2, 4]))
    first = table[2] + table[3] + table[5]
    expected = torch.stack([first / 3 if pooling == "mean" else first, table[4]])
    assert torch.allclose(out[:, 4:8], expected, atol=1e-6)
    assert torch.allclose(out[:, :4], table[[2, 4]])  # the candidate's own embedding first


def test_padding_after_the_length_has_no_effect() -> None:
    for pooling in ("mean", "sum", "attention"):
        embedding = embedding_with([SequenceInput(6, pooling, shares=0, target=0 if pooling == "attention" else None)])
        a = embedding(batch([[2, 3, 0, 0]], [2], [4]))
        b = embedding(batch([[2, 3, 5, 1]], [2], [4]))
        assert torch.equal(a, b), pooling


def test_attention_pooling_is_dins_activation_unit() -> None:
    embedding = embedding_with([SequenceInput(6, "attention", shares=0, target=0)])
    table = embedding.table.weight.detach()
    unit = embedding.attention["0"]
    keys, query = table[[2, 3, 5]], table[4]
    features = torch.cat([keys, query.expand(3, -1), keys - query, keys * query], dim=1)
    weights = unit.score(features).squeeze(-1)  # type: ignore[operator]
    expected = (weights.unsqueeze(1) * keys).sum(0)  # no softmax, as DIN
    out = embedding(batch([[2, 3, 5]], [3], [4]))
    assert torch.allclose(out[0, 4:8], expected, atol=1e-6)


def test_softmax_weights_by_hand() -> None:
    """Softmax over the present items only: padding and empty rows get 0; with counts per id each
    occurrence gets its share."""
    scores = torch.tensor([[0.0, math.log(2.0), 5.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    expected = torch.tensor([[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(blocks.softmax_present(scores, mask), expected, atol=1e-6)
    counts = torch.tensor([[2.0, 1.0, 0.0]])  # id 0 twice: 1/4 each, id 1 once: 2/4
    assert torch.allclose(blocks.softmax_present(scores[:1], counts), torch.tensor([[0.25, 0.5, 0.0]]), atol=1e-6)


def test_softmax_weights_reach_the_model_and_older_runs_read_as_din(tmp_path: Path) -> None:
    """``weights`` goes recipe -> schema -> the model's inputs; left at ``din`` it is not in the
    recipe's dict (earlier recipes keep their cache keys) and a schema written before it reads as
    ``din`` (earlier runs load unchanged)."""
    from mtlcli.data.schema import DataSchema
    from mtlcli.train.checkpoint import input_spec

    source = parquet(tmp_path)
    plain = recipe_for(tmp_path, source, {"hist": {"vocabulary": "item", "pooling": "attention"}})
    assert "weights" not in plain.to_dict()["features"]["sequences"]["hist"]
    options = {"vocabulary": "item", "pooling": "attention", "weights": "softmax"}
    recipe = recipe_for(tmp_path, source, {"hist": options})
    assert recipe.to_dict()["features"]["sequences"]["hist"]["weights"] == "softmax"
    schema = prepare(recipe).schema
    assert [s.weights for s in input_spec(schema).sequences] == ["softmax"]
    older = schema.to_dict()
    del older["sequences"][0]["weights"]
    assert [s.weights for s in input_spec(DataSchema.from_dict(older)).sequences] == ["din"]


@pytest.mark.parametrize("padded", [False, True])
def test_softmax_attention_is_a_weighted_mean_of_the_present_items(
    padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``weights: softmax``: DIN's unit scores, normalised over the real items (summing to 1,
    padding 0), so that repeating the history leaves the pooled vector as it was (DIN's sum
    doubles); the same in training's packed layout and export's padded one."""
    monkeypatch.setattr(blocks, "exporting", lambda: padded)
    monkeypatch.setattr(blocks, "COUNTS_PER_ITEM", 0)  # item by item
    embedding = embedding_with([SequenceInput(6, "attention", shares=0, target=0, weights="softmax")])
    table = embedding.table.weight.detach()
    unit = embedding.attention["0"]
    keys, query = table[[2, 3, 5]], table[4]
    features = torch.cat([keys, query.expand(3, -1), keys - query, keys * query], dim=1)
    weights = torch.softmax(unit.score(features).squeeze(-1), 0)  # type: ignore[operator]
    out = embedding(batch([[2, 3, 5, 0, 0, 0], [2, 3, 5, 2, 3, 5], [0, 0, 0, 0, 0, 0]], [3, 6, 0], [4, 4, 4]))
    assert torch.allclose(out[0, 4:8], (weights.unsqueeze(1) * keys).sum(0), atol=1e-6)
    assert torch.allclose(out[1, 4:8], out[0, 4:8], atol=1e-6)
    assert not out[2, 4:8].any()
    reported = unit.last_weights
    assert reported is not None
    assert torch.allclose(reported.sum(1), torch.tensor([1.0, 1.0, 0.0]), atol=1e-6)
    assert not reported[0, 3:].any()


@pytest.mark.numerics
@pytest.mark.parametrize("weights", ["din", "softmax"])
@pytest.mark.parametrize(("row_wise", "counts"), [(False, False), (False, True), (True, False)])
def test_packed_histories_match_the_padded_layout(
    row_wise: bool, counts: bool, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training reads histories without their padding (item by item: hand-written DIN backward,
    segment sums; or as counts per id where the vocabulary is small); export reads the padded
    layout: the same outputs and gradients, empty histories pooling to 0, with DIN's weights as
    they are or softmax-normalised."""
    monkeypatch.setattr(blocks, "COUNTS_PER_ITEM", 1000 if counts else 0)
    sequences = [
        SequenceInput(7, "attention", shares=0, target=0, weights=weights),
        SequenceInput(5, "mean"),
        SequenceInput(7, "sum", shares=0),
        SequenceInput(9, "attention", shares=1, target=1, weights=weights),
    ]
    rows, longest = 23, 6
    generator = torch.Generator().manual_seed(1)
    sizes = torch.tensor([7, 5, 7, 9]).view(1, -1, 1)
    lengths = torch.randint(0, longest + 1, (rows, 4), generator=generator)
    lengths[0], lengths[1] = 0, longest  # all empty, all full
    b = Batch(
        torch.stack(
            [torch.randint(0, 7, (rows,), generator=generator), torch.randint(0, 9, (rows,), generator=generator)], 1
        ),
        torch.randn(rows, 1, generator=generator),
        torch.zeros(rows, 1),
        torch.ones(rows, 1, dtype=torch.bool),
        sequences=(torch.rand(rows, 4, longest, generator=generator) * sizes).long(),
        sequence_lengths=lengths,
    )
    packed = SplitTensors(b.categorical, b.numeric, b.labels, b.label_mask, **history_parts(b)).packed().all()
    assert packed.history_ids is not None and packed.history_ids.dtype == torch.int32
    results, reports = [], []
    # a padded batch packed by the model, a batch packed by the data layer, export's padded layout
    for batch, padded in ((b, False), (packed, False), (b, True)):
        torch.manual_seed(0)
        embedding = FeatureEmbedding([7, 9], 1, 4, sequences)
        if row_wise:
            embedding.use_sparse_rows()
        monkeypatch.setattr(blocks, "exporting", lambda padded=padded: padded)
        out = embedding(batch)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = {name: p.grad for name, p in embedding.named_parameters() if p.grad is not None}
        if row_wise:
            assert embedding.rows is not None
            grads["rows"] = embedding.rows.grad
        results.append((out.detach(), grads))
        reports.append([embedding.attention[k].last_weights for k in ("0", "3")])  # type: ignore[union-attr]
    *trained, (expected, expected_grads) = results
    for report in reports[:2]:  # each item's weight where the padded layout has it (0 after the length)
        for got, want in zip(report, reports[2], strict=True):
            assert got is not None and want is not None and not want[:, got.shape[1] :].any()
            assert_kernel_close(got, want[:, : got.shape[1]], what="reported weights")
    for out, grads in trained:
        assert torch.equal(out[0, 8:24], torch.zeros(16))  # row 0: every history empty
        assert_kernel_close(out, expected, what="pooled")
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            assert_kernel_close(grads[name], grad, floor=1.0, what=name)
    monkeypatch.setattr(blocks, "exporting", lambda: False)  # a batch whose histories are all empty: no items at all
    assert b.sequences is not None
    empty = dataclasses.replace(b, sequences=b.sequences[:, :, :0], sequence_lengths=torch.zeros_like(lengths))
    assert not embedding(empty)[:, 8:24].any()


@pytest.mark.numerics
def test_bag_gradients_sorted_by_id_match_index_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small table's bag gradient, summed id by id after a sort, is the scatter's (rows no id
    reads get 0)."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (300,), generator=generator)
    of_id = torch.sort(torch.randint(0, 25, (300,), generator=generator)).values
    grads = torch.randn(25, 3, generator=generator)
    got = blocks.bag_gradient(ids, of_id, grads, 43)
    monkeypatch.setattr(blocks, "SORTED_ROWS", 0)
    expected = blocks.bag_gradient(ids, of_id, grads, 43)
    want = torch.zeros(43, 3)
    for i, bag in zip(ids.tolist(), of_id.tolist(), strict=True):
        want[i] += grads[bag]
    assert not got[40:].any()
    assert_kernel_close(got, want, floor=1.0, what="sorted")
    assert_kernel_close(expected, want, floor=1.0, what="index_add")


def history_parts(b: Batch) -> dict[str, Any]:
    return {"sequences": b.sequences, "sequence_lengths": b.sequence_lengths}


def real_ids(sequences: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Padded ids [N, S, L] cut or widened to ``width``, 0 after each length."""
    real = torch.arange(sequences.shape[2]) < lengths.unsqueeze(-1)
    kept = (sequences * real)[..., :width]
    return torch.nn.functional.pad(kept, (0, width - kept.shape[2]))


@pytest.mark.parametrize("world", [1, 2])
def test_packed_splits_give_the_padded_batches(world: int) -> None:
    """A split holding its histories packed gives, shuffled or not, on each rank and for a
    selection of rows, the batches the padded split gives (ids gathered per batch)."""
    padded = random_split(37, 3)
    packed = padded.packed()
    assert packed.sequences is None and packed.history_ids is not None and packed.history_starts is not None
    assert padded.sequence_lengths is not None
    assert packed.history_ids.numel() == int(padded.sequence_lengths.sum())  # the ids present only
    for shuffle in (False, True):
        for rank in range(world):
            pairs = zip(
                padded.batches(8, shuffle, torch.Generator().manual_seed(5), rank=rank, world=world),
                packed.batches(8, shuffle, torch.Generator().manual_seed(5), rank=rank, world=world),
                strict=True,
            )
            for want, got in pairs:
                assert want.sequences is not None and got.sequences is None and got.history_ids is not None
                unpacked = got.padded().sequences
                assert unpacked is not None and want.sequence_lengths is not None
                assert torch.equal(got.sequence_lengths, want.sequence_lengths)
                assert torch.equal(unpacked, real_ids(want.sequences, want.sequence_lengths, unpacked.shape[2]))
    rows = torch.tensor([30, 2, 2, 17, 0])
    chosen = packed.select(rows).padded()
    assert chosen.sequences is not None and padded.sequences is not None and padded.sequence_lengths is not None
    want = real_ids(padded.sequences[rows], padded.sequence_lengths[rows], chosen.sequences.shape[2])
    assert torch.equal(chosen.sequences, want)


def test_own_vocabularies_get_their_own_rows_after_the_features() -> None:
    embedding = embedding_with([SequenceInput(3, "sum"), SequenceInput(6, "sum", shares=0)])
    assert embedding.table.weight.shape[0] == 6 + 3
    table = embedding.table.weight.detach()
    n = 1
    b = Batch(
        torch.tensor([[1]]),
        torch.zeros(n, 1),
        torch.zeros(n, 1),
        torch.ones(n, 1, dtype=torch.bool),
        sequences=torch.tensor([[[2, 0], [2, 0]]]),
        sequence_lengths=torch.tensor([[1, 1]]),
    )
    out = embedding(b)
    assert torch.equal(out[0, 4:8], table[6 + 2]) and torch.equal(out[0, 8:12], table[2])


def test_row_wise_tables_get_the_dense_gradient_of_histories() -> None:
    sequences = [SequenceInput(6, "attention", shares=0, target=0), SequenceInput(3, "mean")]
    dense, rows = embedding_with(sequences), embedding_with(sequences)
    rows.use_sparse_rows()
    b = Batch(
        torch.tensor([[1], [4]]),
        torch.zeros(2, 1),
        torch.zeros(2, 1),
        torch.ones(2, 1, dtype=torch.bool),
        sequences=torch.tensor([[[2, 3, 5], [0, 1, 2]], [[4, 4, 0], [2, 0, 0]]]),
        sequence_lengths=torch.tensor([[3, 2], [2, 1]]),
    )
    dense(b).square().sum().backward()
    rows(b).square().sum().backward()
    assert rows.rows is not None and rows.rows.grad is not None and rows.row_ids is not None
    grad = dense.table.weight.grad
    assert grad is not None
    assert torch.allclose(rows.rows.grad, grad[rows.row_ids], atol=1e-6)
    untouched = torch.ones(grad.shape[0], dtype=torch.bool)
    untouched[rows.row_ids] = False
    assert not grad[untouched].any()


INPUTS = InputSpec(
    cardinalities=[7, 5],
    n_numeric=2,
    tasks=["a", "b"],
    task_types=["binary", "binary"],
    sequences=[SequenceInput(7, "attention", shares=0, target=0), SequenceInput(4, "mean")],
)


def random_split(n: int, seed: int) -> Any:
    from mtlcli.data.batch import SplitTensors

    g = torch.Generator().manual_seed(seed)
    seqs = torch.stack([torch.randint(0, 7, (n, 5), generator=g), torch.randint(0, 4, (n, 5), generator=g)], 1)
    lengths = torch.randint(0, 6, (n, 2), generator=g)
    # labels follow the histories: whether the candidate appears in the first history
    candidate = torch.randint(2, 7, (n, 1), generator=g)
    in_history = ((seqs[:, 0] == candidate) & (torch.arange(5) < lengths[:, :1])).any(1).float()
    numeric = torch.randn(n, 2, generator=g)
    labels = torch.stack([in_history, in_history * (numeric[:, 0] > 0)], 1)  # b implies a (ESMM's funnel)
    cats = torch.cat([candidate, torch.randint(0, 5, (n, 1), generator=g)], 1)
    return SplitTensors(
        cats, numeric, labels, torch.ones(n, 2, dtype=torch.bool), sequences=seqs, sequence_lengths=lengths
    )


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_scheme_learns_from_histories(scheme: str) -> None:
    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(), INPUTS)
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), INPUTS.tasks)
    train, valid = random_split(1024, 1), random_split(256, 2)
    settings = TrainSection(epochs=10, batch_size=64, early_stopping=None, lr=0.01)
    result = fit(model, strategy, train, valid, settings, INPUTS.tasks, INPUTS.task_types, NullObserver())
    # task a is "the candidate is in the first history": without reading it, AUC stays near 0.5
    aucs = [r["valid"]["a"]["auc"] for r in result.history]
    assert max(aucs) > 0.65, (scheme, aucs)


def test_histories_in_a_row_wise_run_train(tmp_path: Path) -> None:
    model = build_model("mmoe", SCHEMES.get("mmoe").params(), INPUTS)
    assert use_sparse_rows(model) == ["embedding"]
    data = random_split(256, 3)
    strategy = build_weighting("pcgrad", WEIGHTINGS.get("pcgrad").params(), INPUTS.tasks)
    batch0 = data.all()
    losses = task_losses(model(batch0), batch0, torch.tensor([True, True]))
    strategy.backward(losses, model)
    ((_, table),) = sparse_embeddings(model)
    assert table.rows is not None and table.rows.grad is not None and table.rows.grad.abs().sum() > 0


def test_attention_histories_beat_no_histories_on_generated_data(tmp_path: Path, in_repo: Path) -> None:
    """The generator's clicks follow the click history and purchases the purchase history: MMoE
    with the histories pooled by attention must beat MMoE without them on both tasks."""
    from mtlcli.recipe import load_recipe
    from mtlcli.train.run import train_run

    sets = ["train.epochs=20", f"data.cache_dir={tmp_path / 'cache'}"]
    auc = {}
    for name, extra in (("with", []), ("without", ["features.sequences={}"])):
        summary = train_run(load_recipe("recipes/sequences-mmoe.yaml", [*sets, *extra]), tmp_path / name)
        auc[name] = {t: m["auc"] for t, m in summary["valid"].items()}
    assert auc["with"]["click"] > auc["without"]["click"] + 0.05, auc
    assert auc["with"]["buy"] > auc["without"]["buy"] + 0.05, auc


@pytest.mark.parametrize(
    ("sequences", "data", "expect"),
    [
        (
            {"hist": {"vocabulary": "nope"}},
            None,
            "features.sequences.hist.vocabulary: 'nope' is not a categorical feature",
        ),
        ({"hist": {"column": "missing"}}, None, "features.sequences.hist.column: column 'missing' is not in the data"),
        ({"click2": {"max_len": 3}}, "numbers", "column 'click2' holds Int64, not a list of ids"),
        ({"floats": {"max_len": 3}}, "floats", "column 'floats' holds List(Float64), not a list of ids"),
    ],
)
def test_bad_histories_are_named(tmp_path: Path, sequences: dict[str, Any], data: str | None, expect: str) -> None:
    source = parquet(tmp_path)
    if data is not None:
        frame = pl.read_parquet(source).with_columns(
            pl.lit(1, pl.Int64).alias("click2"), pl.lit([1.5, 2.5], pl.List(pl.Float64)).alias("floats")
        )
        frame.write_parquet(source)
    with pytest.raises(DataError) as caught:
        prepare(recipe_for(tmp_path, source, sequences))
    assert expect in caught.value.message


@pytest.mark.parametrize("value", [[], None])
def test_a_column_of_only_empty_histories_is_empty_histories(tmp_path: Path, value: Any) -> None:
    """A history column holding only [] (polars: a list of nulls) or only null (polars: null) is an
    empty history on every row, as a missing value is, with its parallel lists alike."""
    frame = pl.DataFrame({"item": ITEMS, "click": [1, 0, 1, 0, 1, 0, 0, 1]}).with_columns(
        *(pl.Series(c, [value] * len(ITEMS)) for c in ("hist", "kinds", "times")), t=pl.lit(5)
    )
    frame.write_parquet(tmp_path / "e.parquet")
    options = {"vocabulary": "item", "type_column": "kinds", "time_column": "times", "row_time": "t"}
    prepared = prepare(recipe_for(tmp_path, tmp_path / "e.parquet", {"hist": options}))
    assert encoded(prepared, "train", "hist") == [[]] * 4


def test_a_kept_type_that_never_occurs_is_named(tmp_path: Path) -> None:
    """types: [v, w] warns about 'w' (naming the types seen); types: [w] alone would leave every
    history empty, and is refused."""
    source = mixed_source(tmp_path, "parquet")
    options = {"vocabulary": "item", "type_column": "kinds", "time_column": "times"}
    prepared = prepare(recipe_for(tmp_path, source, {"hist": options | {"types": ["v", "w"]}}))
    assert prepared.schema.warnings[0] == (
        "features.sequences.hist.types: the type 'w' never occurs in column 'kinds' (types seen: 'b', 'v'); "
        "it keeps no id"
    )
    with pytest.raises(DataError, match=r"hist.types: none of the types 'w' occurs in column 'kinds', so every"):
        prepare(recipe_for(tmp_path, source, {"hist": options | {"types": ["w"]}}))


@pytest.mark.parametrize(
    ("times", "shown"),
    [([1.0, None], "[1.0, null]"), ([1.0, float("inf")], "[1.0, inf]"), ([float("nan"), 2.0], "[NaN, 2.0]")],
)
def test_a_timestamp_that_is_null_or_not_finite_names_column_and_row(
    tmp_path: Path, times: list[float | None], shown: str
) -> None:
    """A null, infinite or NaN timestamp inside a Parquet list is refused, naming the column, the
    row and the list (a null was a polars cast message naming neither; inf was accepted)."""
    frame = pl.DataFrame(
        {
            "item": ITEMS,
            "hist": [["a", "b"]] * len(ITEMS),
            "times": [[1.0, 2.0]] * 4 + [times] + [[1.0, 2.0]] * 3,
            "click": [1, 0, 1, 0, 1, 0, 0, 1],
        }
    )
    frame.write_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError) as caught:
        prepare(recipe_for(tmp_path, tmp_path / "t.parquet", {"hist": {"vocabulary": "item", "time_column": "times"}}))
    assert caught.value.message == (
        "features.sequences.hist.time_column: column 'times' has a timestamp that is missing, not a number or "
        f"infinite: {shown!r} (data row 5)"
    )


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"pooling": "attention"}, "attention pooling compares the history with a categorical feature"),
        ({"max_len": 0}, "greater than 0"),
        ({"target": "item"}, "'target' is for attention pooling only"),
        ({"weights": "softmax"}, "'weights' is for attention pooling only"),
        ({"pooling": "attention", "weights": "sum"}, "weights: 'sum' is not one of: din, softmax"),
        ({"pooling": "max"}, "mean"),
        ({"types": ["click"]}, "'types' keeps the ids of some behaviour types: set 'type_column' too"),
        (
            {"row_time": "t"},
            "'row_time' keeps the ids before the row's time: set 'time_column' too",
        ),
        ({"events": {"source": "e.csv"}, "type_column": "kinds"}, "'type_column' is for list columns"),
    ],
)
def test_bad_history_options_are_recipe_errors(tmp_path: Path, options: dict[str, Any], expect: str) -> None:
    from mtlcli.errors import RecipeError

    with pytest.raises(RecipeError) as caught:
        recipe_for(tmp_path, parquet(tmp_path), {"tags": options})
    assert expect in str(caught.value)


@pytest.mark.parametrize("scheme", ["mmoe", "dtrn"])
def test_histories_are_served_from_parquet_jsonl_and_csv(tmp_path: Path, scheme: str) -> None:
    """Export (safetensors and ONNX, which verifies against torch) and `mtl predict` on raw rows
    with list columns: Parquet lists, JSON-lines arrays and "|"-separated CSV text all give eval's
    test AUC, for MMoE with pooled histories and for DTRN."""
    from typer.testing import CliRunner

    from mtlcli.cli.app import app
    from mtlcli.data.sequential import generate_sequences
    from mtlcli.recipe.schema import SyntheticSource
    from mtlcli.train.metrics import auc

    frame = generate_sequences(SyntheticSource(kind="sequences", rows=3000, history=12))
    frame.write_parquet(tmp_path / "log.parquet")
    recipe = {
        "data": {"source": "log.parquet", "split": {"by": "modulo", "modulus": 5, "test": [0], "valid": [1]},
                 "cache_dir": "cache"},
        "features": {"categorical": ["item", "topic"], "sequences": {
            "click_topics": {"vocabulary": "topic", "max_len": 12, "pooling": "attention"},
            "buys": {"vocabulary": "item", "max_len": 4, "pooling": "mean"},
            "clicks": {"max_len": 6, "pooling": "sum"}}},
        "tasks": {"click": {"label": "click"}, "buy": {"label": "buy"}},
        "model": {"scheme": "mmoe", "embedding_dim": 4, "n_experts": 2, "expert_units": [8], "tower_units": [4]}
                 if scheme == "mmoe" else {"scheme": "dtrn", "embedding_dim": 4, "tower_units": [4]},
        "train": {"epochs": 2, "batch_size": 256, "early_stopping": None, "threads": 1},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert runner.invoke(app, ["train", "recipe.yaml", "--out", "run", "--quiet"]).exit_code == 0
        evaluated = runner.invoke(app, ["eval", "run", "--json"])
        assert evaluated.exit_code == 0, evaluated.output
        expected = {t: m["auc"] for t, m in json.loads(evaluated.stdout)["tasks"].items()}
        exported = runner.invoke(app, ["export", "run", "--out", "bundle", "--format", "onnx"])
        assert exported.exit_code == 0, exported.output
        test = frame.with_row_index("i").filter(pl.col("i") % 5 == 0).drop("i")
        test.write_parquet("test.parquet")
        test.write_ndjson("test.jsonl")
        lists = [c for c, t in test.schema.items() if isinstance(t, pl.List)]
        test.with_columns(pl.col(c).list.join("|") for c in lists).write_csv("test.csv")
        for source, engine in [("test.parquet", "torch"), ("test.jsonl", "torch"), ("test.csv", "torch"),
                               ("test.parquet", "onnxruntime")]:  # fmt: skip
            scored = runner.invoke(app, ["predict", "bundle", "--input", source, "--engine", engine, "-f", "parquet",
                                         "--output", f"out-{source}-{engine}.parquet"])  # fmt: skip
            assert scored.exit_code == 0, (source, scored.output)
            out = pl.read_parquet(f"out-{source}-{engine}.parquet")
            for task in ("click", "buy"):
                got = auc(torch.tensor(out[task].to_numpy()), torch.tensor(test[task].to_numpy()).float())
                assert got == pytest.approx(expected[task], abs=1e-6), (source, engine, task)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("buy_from", ["buys", "clicks"])
def test_the_generator_drives_each_task_by_its_history(buy_from: str) -> None:
    """click follows the share of recent clicks in the candidate's topic; buy the share of recent
    purchases, or with ``buy_from: clicks`` (the control) the clicks' share too."""
    from mtlcli.data.sequential import TOPICS, generate_sequences
    from mtlcli.recipe.schema import SyntheticSource
    from mtlcli.train.metrics import auc

    frame = generate_sequences(SyntheticSource(kind="sequences", rows=20000, buy_from=buy_from))  # type: ignore[arg-type]
    topic = frame["topic"].cast(pl.Int64)

    def share(column: str) -> torch.Tensor:
        topics = frame[column].list.eval(pl.element().cast(pl.Int64) % TOPICS)
        matches = (topics.list.eval(pl.element()) - topic).list.eval(pl.element() == 0).list.mean()
        return torch.tensor(matches.to_numpy())

    def reads(task: str, column: str) -> float:
        return auc(share(column), torch.tensor(frame[task].to_numpy()).float())

    assert reads("click", "clicks") > 0.65 and abs(reads("click", "buys") - 0.5) < 0.03
    driver, other = ("buys", "clicks") if buy_from == "buys" else ("clicks", "buys")
    assert reads("buy", driver) > 0.65 and abs(reads("buy", other) - 0.5) < 0.03
