"""Weights as data: `Store.weights` / `iter_weights` against per-checkpoint loads, layouts."""

import shutil

import polars as pl
import pytest
import torch

import dlstore
from dlstore.architectures.cnn1d import CNN1dOptions
from dlstore.architectures.mlp import MLPOptions
from dlstore.errors import CorruptBlobError, LayoutError, NotFoundError, QueryError
from dlstore.layout import Layout
from dlstore.store.writer import StoreWriter

ALL = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"
WIDE = ("SELECT run_id, step FROM checkpoints JOIN runs USING (run_id) WHERE width = 16 "
        "ORDER BY run_id, step")


@pytest.mark.parametrize("module", [
    MLPOptions(arch="mlp", width=7, depth=3).build((12,), 5),
    CNN1dOptions(arch="cnn1d", width=4, depth=2, kernel=3).build((20,), 3),
])
def test_layout_round_trips(module):
    state = module.state_dict()
    layout = Layout.from_state_dict(state)
    assert layout.size == sum(v.numel() for v in state.values())
    flat = layout.flatten(state)
    back = layout.unflatten(flat)
    assert list(back) == list(state)
    for name, value in state.items():
        assert torch.equal(back[name], value)
    # leading batch axes pass through, in both directions
    stacked = {k: torch.stack([v, 2 * v]) for k, v in state.items()}
    rows = layout.flatten(stacked)
    assert rows.shape == (2, layout.size) and torch.equal(rows[1], 2 * flat)
    assert torch.equal(layout.unflatten(rows)[layout.names[0]][0], state[layout.names[0]])
    assert Layout.from_json(layout.to_json()) == layout
    rows_csv = layout.rows()
    assert rows_csv[0]["start_idx"] == 0 and rows_csv[-1]["end_idx"] == layout.size
    assert all(a["end_idx"] == b["start_idx"] for a, b in zip(rows_csv, rows_csv[1:]))


def test_layout_refuses_what_does_not_fit():
    layout = Layout.from_shapes([("w", (3, 2)), ("b", (3,))])
    with pytest.raises(LayoutError, match="lacks tensors"):
        layout.flatten({"w": torch.zeros(3, 2)})
    with pytest.raises(LayoutError, match="shape"):
        layout.flatten({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    with pytest.raises(LayoutError, match="does not fit"):
        layout.unflatten(torch.zeros(8))
    with pytest.raises(LayoutError, match="twice"):
        Layout.from_shapes([("w", (1,)), ("w", (2,))])
    wide = Layout.union([layout, Layout.from_shapes([("w", (5, 2)), ("b", (5,))])])
    assert wide["w"].shape == (5, 2) and wide.size == 15
    with pytest.raises(LayoutError, match="different tensors"):
        Layout.union([layout, Layout.from_shapes([("v", (3, 2)), ("b", (3,))])])


def test_weights_equal_load_state_dict_for_every_row(built_store):
    rows = built_store.sql(WIDE)
    weights, layout = built_store.weights(WIDE)
    assert weights.shape == (rows.height, layout.size) and rows.height == 20
    assert layout.names == ["layers.0.weight", "layers.0.bias", "layers.1.weight",
                            "layers.1.bias"]
    assert layout["layers.0.weight"].shape == (16, 10)
    for i, (run_id, step) in enumerate(rows.iter_rows()):
        assert torch.equal(weights[i], layout.flatten(built_store.load_state_dict(run_id, step)))


def test_query_order_and_repeats_are_kept(built_store):
    rows = built_store.sql(WIDE)
    reordered = pl.concat([rows.reverse(), rows.head(2)])
    weights, layout = built_store.weights(reordered)
    straight, _ = built_store.weights(WIDE)
    assert torch.equal(weights[:rows.height], straight.flip(0))
    assert torch.equal(weights[rows.height:], straight[:2])


def test_runs_of_several_widths_pad_into_a_given_layout(built_store):
    with pytest.raises(LayoutError, match=r"mixes 2 weight layouts: run \S+ has layers.0.weight "
                                          r"\[\d+, 10\] where run \S+ has \[\d+, 10\]"):
        built_store.weights(ALL)
    layouts, which = built_store.weight_layouts(ALL)
    assert sorted(lay["layers.0.weight"].shape[0] for lay in layouts) == [8, 16]
    union = Layout.union(layouts)
    weights, layout = built_store.weights(ALL, layout=union)
    assert layout == union
    for i, (run_id, step) in enumerate(built_store.sql(ALL).iter_rows()):
        state = built_store.load_state_dict(run_id, step)
        assert sorted(layouts[which[i]].names) == sorted(state)
        padded = union.unflatten(weights[i])
        for name, value in state.items():
            region = tuple(slice(0, n) for n in value.shape)
            assert torch.equal(padded[name][region], value)
            outside = padded[name].clone()
            outside[region] = 0
            assert not outside.any()


def test_a_layout_may_name_a_subset_of_tensors(built_store):
    full, layout = built_store.weights(WIDE)
    part = Layout.from_shapes([("layers.1.weight", (4, 16))])
    weights, _ = built_store.weights(WIDE, layout=part)
    assert torch.equal(weights, full[:, layout["layers.1.weight"].slice])


def test_streaming_equals_the_bulk_pull(built_store):
    union = Layout.union(built_store.weight_layouts(ALL)[0])
    bulk, _ = built_store.weights(ALL, layout=union)
    frames, batches = [], []
    for frame, batch in built_store.iter_weights(ALL, batch_size=7, layout=union):
        assert batch.shape[0] == frame.height <= 7
        frames.append(frame)
        batches.append(batch)
    assert len(batches) == 6  # 40 rows
    assert torch.equal(torch.cat(batches), bulk)
    assert pl.concat(frames).equals(built_store.sql(ALL))
    with pytest.raises(QueryError, match="batch_size"):
        next(built_store.iter_weights(WIDE, batch_size=0))


def test_bad_pulls_are_clear_errors(built_store):
    with pytest.raises(QueryError, match="run_id and step"):
        built_store.weights("SELECT run_id FROM runs")
    with pytest.raises(NotFoundError, match=r"1 of 3 \(run_id, step\) rows have no checkpoint.*"
                                            r"\(nope, 3\)"):
        built_store.weights(pl.concat([built_store.sql(WIDE).head(2),
                                       pl.DataFrame({"run_id": ["nope"], "step": [3]})]))
    with pytest.raises(QueryError, match="null"):
        built_store.weights("SELECT run_id, NULL::BIGINT AS step FROM runs")
    with pytest.raises(NotFoundError, match="no checkpoints"):
        built_store.weights("SELECT run_id, step FROM checkpoints WHERE false")
    layout = Layout.from_shapes([("layers.0.weight", (16, 10))])
    empty, _ = built_store.weights("SELECT run_id, step FROM checkpoints WHERE false", layout)
    assert empty.shape == (0, 160)
    with pytest.raises(LayoutError, match="no tensor 'conv.weight'"):
        built_store.weights(WIDE, layout=Layout.from_shapes([("conv.weight", (3,))]))
    with pytest.raises(LayoutError, match=r"shape \[16, 10\], which does not fit .*\[8, 10\]"):
        built_store.weights(WIDE, layout=Layout.from_shapes([("layers.0.weight", (8, 10))]))


def test_weights_verify_shards(tmp_path, built_store):
    copy = tmp_path / "copy"
    shutil.copytree(built_store.root, copy)
    store = dlstore.open(copy)
    row = store.sql(WIDE).row(0)
    blob = store.checkpoint(*row)["blob"]
    path = store.blobs.path(blob)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError, match="corrupted"):
        store.weights(WIDE)
    with pytest.raises(CorruptBlobError, match="corrupted"):
        next(store.iter_weights(WIDE, batch_size=100))


def test_read_members_any_order_gaps_and_repeats(built_store):
    blob = built_store.checkpoint(built_store.sql(WIDE)["run_id"][0], 0)["blob"]
    n = built_store.blobs.layout(blob)[1]
    assert n == 4
    whole = built_store.blobs.read_members(blob, list(range(n)), ["layers.0.weight"])
    for members in ([3, 0], [2, 2, 0, 3], [1], [0, 3], [3, 2, 1, 0]):
        got = built_store.blobs.read_members(blob, members, ["layers.0.weight"])
        assert torch.equal(got["layers.0.weight"], whole["layers.0.weight"][members])
    with pytest.raises(CorruptBlobError, match="holds no tensor"):
        built_store.blobs.read_members(blob, [0], ["no.such.tensor"])


def test_shards_of_every_dtype_read_back_and_pull_into_the_layout_dtype(tmp_path):
    """bfloat16 (which numpy lacks), float16, int64 and bool tensors come back bit for bit, and
    a pull converts them to the layout's dtype."""
    store = dlstore.Store(tmp_path / "s", create=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
               "b": torch.randn(3, 5, generator=g).to(torch.float16),
               "c": torch.arange(6).reshape(3, 2),
               "d": torch.rand(3, 3, generator=g) > 0.5}
    blob = store.blobs.put(tensors, {})
    got = store.blobs.read_members(blob, [2, 0, 2], list(tensors))
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value[[2, 0, 2]])
    one = store.blobs.read_member(blob, 1)
    assert all(torch.equal(one[k], v[1]) for k, v in tensors.items())
    layout = Layout.from_shapes([(k, v.shape[1:]) for k, v in tensors.items()], "bfloat16")
    StoreWriter(store).commit([{"run_id": f"r{m}", "step": 0, "blob": blob, "member": m}
                               for m in range(3)], [], [{"run_id": f"r{m}"} for m in range(3)])
    pulled, _ = store.weights("SELECT run_id, step FROM checkpoints ORDER BY run_id DESC",
                              layout=layout)
    assert pulled.dtype == torch.bfloat16
    expected = layout.flatten({k: v.flip(0).to(torch.bfloat16) for k, v in tensors.items()})
    assert torch.equal(pulled, expected)


def test_a_pull_by_a_query_over_other_views_finds_the_checkpoints(built_store):
    """A fresh store whose first query names only `final` still resolves the checkpoints."""
    store = dlstore.open(built_store.root)
    query = ("SELECT run_id, step FROM final WHERE metric = 'test_acc' AND run_id IN "
             "(SELECT run_id FROM runs WHERE width = 16) ORDER BY run_id")
    weights, layout = store.weights(query)
    keys = store.sql(query).rows()
    assert weights.shape == (len(keys), layout.size) and len(keys) > 0
    for row, (run_id, step) in zip(weights, keys):
        assert torch.equal(row, layout.flatten(store.load_state_dict(run_id, step)))
