"""Lottery tickets as phases of a build: spec sections, lineage ids, masked training against the
plain loop, and the store a tiny tickets zoo leaves (rewinding, masks, controls, stability,
transfer, resuming, the report)."""

import dataclasses
import textwrap

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from dlstore.architectures.base import init_state
from dlstore.building.build import build_zoo
from dlstore.building.plan import cohort_plan, plan_cohorts
from dlstore.cli import app
from dlstore.datasets.base import run_data
from dlstore.errors import NotFoundError, SpecError, StoreError, UsageError
from dlstore.experiments.pruning import full_mask, magnitude_prune, random_mask_like, removed_count
from dlstore.experiments.tickets import TicketRun, ticket_phases
from dlstore.spec import RunConfig, ZooSpec
from dlstore.store.maintenance import verify
from dlstore.store.store import Store
from dlstore.training.cohort import CohortTrainer
from dlstore.training.reference import train_reference

ATOL = 1e-5  # cohort vs alone, as in test_population

TICKET_SPEC = textwrap.dedent("""
    name = "imp"
    seeds = 1
    checkpoints = "log:3"

    [dataset]
    name = "gaussian_mixture"
    n_samples = 400

    [model]
    arch = "mlp"
    width = 12
    depth = 2

    [train]
    lr = 0.05
    batch_size = 32
    epochs = 2

    [tickets]
    levels = 2
    rewind_steps = [0, 3]
    stability = true

    [transfer]
    rewind_steps = [3]
    [transfer.targets.adam]
    train.optimizer = "adam"
    train.lr = 0.01
""")
# 10 -> 12 -> 12 -> 4: prunable weights 120 + 144 (hidden) and 48 (output)
HIDDEN, OUTPUT = 264, 48


def tickets_spec(extra: str = "", text: str = TICKET_SPEC) -> ZooSpec:
    return ZooSpec.from_text(text + textwrap.dedent(extra))


@pytest.fixture(scope="module")
def ticket_store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("tickets") / "s", create=True)
    report = build_zoo(tickets_spec(), store, device="cpu")
    assert report.runs_built == report.runs_total == 32
    return store


def lineage(store: Store):
    return store.sql("SELECT r.*, t.kind FROM runs r JOIN tickets t USING (run_id)")


# -- spec ------------------------------------------------------------------------------------

def test_spec_sections_expand_into_phases_of_lineage():
    spec = tickets_spec()
    phases = ticket_phases(spec)
    # dense: the spec's run + the adam condition's; level 1: per rewind step a ticket, 2
    # controls, a stability copy, plus 2 level-0 copies and adam's own ticket; level 2 adds
    # adam's controls and the transfer of the rewind-3 ticket with its 2 controls
    assert [len(p) for p in phases] == [2, 16, 14]
    level2 = {(r.control, r.condition, r.source_run_id is not None) for r in phases[2]}
    assert (None, "adam", True) in level2 and ("random_mask", "adam", True) in level2
    tickets = [r for r in phases[2] if r.control is None and r.condition is None]
    parents = {r.run_id for r in phases[1] if r.control is None and r.condition is None}
    assert {r.parent_run_id for r in tickets} == parents
    assert phases[0][0].extra_checkpoints == (0, 3)  # rewind steps are saved


def test_ticket_run_ids_are_stable_and_plain_ids_unchanged():
    """Guards the store format for tickets, like test_run_ids_are_stable_across_versions."""
    spec = tickets_spec()
    phases = ticket_phases(spec)
    # level-0 stability copy, level-1 ticket, its reinit and random-mask controls (rewind 0)
    assert [r.run_id for r in phases[1][:4]] == [
        "imp-4ceef13e6eac", "imp-2d85cc740a1d", "imp-11dbd7a2c8bb", "imp-8ec97bea2731"]
    # the level-2 ticket of rewind 3 transferred to the adam condition, and its controls
    assert [r.run_id for r in phases[2] if r.source_run_id] == [
        "imp-67b97bd7583c", "imp-e2ebf79d698e", "imp-6cd27e320099"]
    # the dense run of a tickets zoo also saves its rewind steps: another run than without
    plain = ZooSpec.from_text(TICKET_SPEC.split("[tickets]")[0])
    assert spec.runs[0].run_id != plain.runs[0].run_id
    assert spec.runs[0].canonical() == {**plain.runs[0].canonical(), "extra_checkpoints": [0, 3]}
    layerwise = ZooSpec.from_text(TICKET_SPEC.replace("levels = 2", "levels = 2\nscope = "
                                                      "'layerwise'"))
    assert ticket_phases(layerwise)[1][1].run_id != phases[1][1].run_id  # the mask rule counts
    assert ticket_phases(layerwise)[1][0].run_id == phases[1][0].run_id  # a dense copy: no mask


@pytest.mark.parametrize("old, new, field", [
    ("levels = 2", "levels = 0", "tickets.levels"),
    ("levels = 2", "levels = 2\nprune_fraction = 1.5", "tickets.prune_fraction"),
    ("levels = 2", "levels = 2\nscope = 'everywhere'", "tickets.scope"),
    ("rewind_steps = [0, 3]", "rewind_steps = [3, 3]", "tickets.rewind_steps"),
    ("rewind_steps = [0, 3]", "rewind_steps = -1", "tickets.rewind_steps"),
    ("levels = 2", "levels = 2\ncontrols = ['shuffle']", "tickets.controls"),
    ("levels = 2", "levels = 2\nsparsity = 0.9", "tickets.sparsity"),
    ("rewind_steps = [3]\n[transfer", "rewind_steps = [5]\n[transfer", "transfer.rewind_steps"),
    ("rewind_steps = [3]\n[transfer", "levels = [3]\n[transfer", "transfer.levels"),
    ("rewind_steps = [3]\n[transfer", "seeds = [9]\n[transfer", "transfer.seeds"),
    ('train.lr = 0.01', 'train.lr = -1.0', "transfer.targets.adam.train.lr"),
    ('train.lr = 0.01', 'model.width = 32', "transfer.targets.adam.model.width"),
    ('train.lr = 0.01', 'dataset.colour = 1', "transfer.targets.adam: dataset.colour"),
    ("[transfer.targets.adam]", "[transfer.targets.base]", "transfer.targets"),
    ("[transfer.targets.adam]\ntrain.optimizer = \"adam\"\ntrain.lr = 0.01",
     "[transfer.targets.same]\nseed_offset = 0", "transfer.targets.same.seed_offset"),
    ("[transfer.targets.adam]\ntrain.optimizer = \"adam\"\ntrain.lr = 0.01",
     "[transfer.targets.same]\ntrain.lr = 0.05", "transfer.targets.same"),
])
def test_bad_tickets_and_transfer_input_is_one_line_naming_the_field(old, new, field):
    text = TICKET_SPEC.replace(old, new)
    assert text != TICKET_SPEC
    with pytest.raises(SpecError) as error:
        ZooSpec.from_text(text)
    assert str(error.value).startswith(field) and "\n" not in str(error.value)


def test_transfer_needs_tickets_and_matching_shapes(tmp_path):
    with pytest.raises(SpecError, match="^transfer: needs a \\[tickets\\]"):
        ZooSpec.from_text(TICKET_SPEC.replace("[tickets]\nlevels = 2", "[x]")
                          .replace("[x]\nrewind_steps = [0, 3]\nstability = true\n", ""))
    other_shape = tickets_spec(text=TICKET_SPEC.replace("train.lr = 0.01", "dataset.dim = 7"))
    with pytest.raises(SpecError, match="^transfer.targets.adam: its dataset gives inputs of "
                                        "shape \\[7\\]"):
        build_zoo(other_shape, Store(tmp_path / "s", create=True), device="cpu")
    late = tickets_spec(text=TICKET_SPEC.replace("[0, 3]", "[0, 3, 500]"))
    with pytest.raises(SpecError, match="^tickets.rewind_steps: step 500 is past the last step"):
        build_zoo(late, Store(tmp_path / "t", create=True), device="cpu")


# -- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [
    "optimizer = 'sgd'\nmomentum = 0.9\nweight_decay = 0.01\nschedule = 'cosine'",
    "optimizer = 'adam'\nlr = 0.01\nweight_decay = 0.001",
])
def test_cohort_of_masked_members_equals_masked_members_trained_alone(train):
    spec = ZooSpec.from_text(textwrap.dedent(f"""
        name = "eq"
        seeds = 2
        checkpoints = "every:10"
        [dataset]
        name = "gaussian_mixture"
        n_samples = 250
        [model]
        arch = "mlp"
        width = 16
        [train]
        {train}
        batch_size = 25
        epochs = 2
        [grid]
        train.lr = [0.02, 0.05]
    """))
    # members of several levels and kinds in one cohort: dense, masks of 3 densities, a random
    # mask; all start mid-epoch (8 steps an epoch) at step 5 from "rewound" weights of another
    # seed
    runs, starts = [], []
    for i, run in enumerate(spec.runs):
        fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)}
        ticket = TicketRun(**fields, ticket_id=f"eq-{i}", level=i, rewind_step=5)
        data = run_data(run.dataset, run.seed)
        rewound = init_state(run.model, data.input_shape, data.n_classes, 100 + i)
        mask = None
        if i:
            mask = magnitude_prune(full_mask(rewound), rewound, 0.3 * i, 0.15 * i, "global")
            mask = random_mask_like(mask, i) if i == 3 else mask
        runs.append(ticket)
        starts.append((rewound, mask))
    [(cohort, datas)] = plan_cohorts(runs, cohort_size=8)
    plan = cohort_plan(cohort, datas)
    assert plan.start_step == 5 and plan.checkpoint_steps[0] == 5
    for member, (rewound, mask) in zip(plan.members, starts):
        member.init, member.mask = rewound, mask
    together = {ck.step: ck.params for ck in CohortTrainer(plan).run()}
    for i, (run, (rewound, mask)) in enumerate(zip(cohort, starts)):
        alone = train_reference(run, run_data(run.dataset, run.seed), init=rewound, mask=mask)
        assert sorted(alone) == sorted(together) == [5, 10, 16]
        for step, state in alone.items():
            for name, value in state.items():
                torch.testing.assert_close(together[step][name][i], value, atol=ATOL, rtol=0)
                if mask is not None and name in mask:  # pruned: exactly zero in both
                    assert torch.count_nonzero(value[~mask[name]]) == 0
                    assert torch.count_nonzero(together[step][name][i][~mask[name]]) == 0
        assert not torch.equal(alone[16]["layers.0.weight"], alone[5]["layers.0.weight"])


# -- a built tickets zoo ---------------------------------------------------------------------

def test_rewinding_restores_exactly_the_stored_weights(ticket_store):
    runs = ticket_store.sql("""
        SELECT run_id, control, mask_id, rewind_step, init_seed,
               json_extract_string(config, '$.ticket.dense_run_id') AS dense_run_id
        FROM runs WHERE level > 0""")
    assert runs.height == 28
    masks = ticket_store.load_masks(runs["mask_id"].to_list())
    starts = ticket_store.load_state_dicts(list(zip(runs["run_id"], runs["rewind_step"])))
    rewound = ticket_store.load_state_dicts(list(zip(runs["dense_run_id"],
                                                     runs["rewind_step"])))
    model = ZooSpec.from_text(TICKET_SPEC).runs[0].model
    for row, start, source in zip(runs.iter_rows(named=True), starts, rewound):
        if row["control"] == "reinit":  # the same mask on a fresh init of its own seed
            source = init_state(model.model_copy(update={"init_seed": row["init_seed"]}),
                                (10,), 4, run_seed=0)
        mask = masks[row["mask_id"]]
        for name, value in source.items():
            want = value * mask[name] if name in mask else value
            assert torch.equal(start[name], want), (row["control"], name)
    reinit = runs.filter(pl.col("control") == "reinit")
    assert reinit["init_seed"].n_unique() == reinit.height  # each its own fresh init


def test_pruned_weights_are_exactly_zero_at_every_checkpoint(ticket_store):
    rows = ticket_store.sql("SELECT c.run_id, c.step, r.mask_id FROM checkpoints c "
                            "JOIN runs r USING (run_id) WHERE r.level > 0")
    assert rows.height >= 28 * 2
    masks = ticket_store.load_masks(rows["mask_id"].to_list())
    states = ticket_store.load_state_dicts(list(zip(rows["run_id"], rows["step"])))
    for mask_id, state in zip(rows["mask_id"], states):
        for name, keep in masks[mask_id].items():
            assert torch.count_nonzero(state[name][~keep]) == 0
            assert torch.count_nonzero(state[name][keep]) > 0.9 * int(keep.sum())


def test_masks_have_exact_densities_and_follow_the_trained_weights(ticket_store):
    masks = ticket_store.sql("SELECT m.*, r.control, r.parent_run_id FROM masks m "
                             "JOIN runs r USING (run_id) ORDER BY level")
    assert set(masks["control"].to_list()) == {None, "random_mask"}
    for row in masks.iter_rows(named=True):
        hidden, output = HIDDEN, OUTPUT
        for _ in range(row["level"]):
            hidden -= removed_count(0.2, hidden)
            output -= removed_count(0.1, output)  # the output layer at half the rate
        assert row["density"] == pytest.approx((hidden + output) / (HIDDEN + OUTPUT), abs=1e-12)
        assert row["tensor_names"] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
        assert row["tensor_densities"][2] == pytest.approx(output / OUTPUT, abs=1e-12)
        if row["control"] is None:  # magnitude pruning of the parent's trained weights
            parent = ticket_store.run(row["parent_run_id"])
            before = (ticket_store.load_mask(parent["mask_id"]) if parent["level"] else
                      full_mask(ticket_store.load_state_dict(parent["run_id"])))
            want = magnitude_prune(before, ticket_store.load_state_dict(parent["run_id"]), 0.2,
                                   0.1, "global")
            got = ticket_store.load_mask(row["mask_id"])
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_controls_have_their_tickets_layerwise_densities(ticket_store):
    rows = ticket_store.sql("""
        SELECT c.control, tm.tensor_densities AS ticket, cm.tensor_densities AS control_d,
               c.mask_id = t.mask_id AS same_mask
        FROM runs c JOIN runs t ON t.parent_run_id = c.parent_run_id
             AND t.rewind_step = c.rewind_step AND t.control IS NULL
             AND coalesce(t.condition, '') = coalesce(c.condition, '')
             AND coalesce(t.source_run_id, '') = coalesce(c.source_run_id, '')
        JOIN masks tm ON tm.mask_id = t.mask_id JOIN masks cm ON cm.mask_id = c.mask_id
        WHERE c.control IN ('reinit', 'random_mask') AND c.level > 0""")
    # 2 controls x (2 rewind steps x 2 levels + adam's own tickets at 2 levels + 2 transfers)
    assert rows.height == 16 and set(rows["control"]) == {"reinit", "random_mask"}
    for control, ticket, other, same in rows.iter_rows():
        assert other == ticket
        assert same == (control == "reinit")


def test_load_mask_round_trips(ticket_store):
    mask_id = ticket_store.sql("SELECT mask_id FROM masks WHERE level = 2 LIMIT 1")["mask_id"][0]
    mask = ticket_store.load_mask(mask_id)
    assert all(v.dtype == torch.bool for v in mask.values())
    assert ticket_store.load_masks([mask_id])[mask_id].keys() == mask.keys()
    with pytest.raises(NotFoundError, match="no mask 'nope'"):
        ticket_store.load_mask("nope")


def test_stability_barriers_are_recorded_per_copy(ticket_store):
    pairs = ticket_store.sql("""
        SELECT g.value, g.run_ids, c.level, c.rewind_step, c.parent_run_id, c.order_seed,
               t.order_seed AS ticket_order_seed
        FROM group_metrics g JOIN runs c ON c.run_id = g.run_ids[2]
        JOIN runs t ON t.run_id = g.run_ids[1]
        WHERE g.metric = 'test_error_barrier'""")
    assert pairs.height == 2 * 3  # per rewind step: dense (level 0) and levels 1, 2
    assert (pairs["order_seed"] != pairs["ticket_order_seed"]).all()
    assert pairs["value"].min() >= -1e-9 and pairs["value"].max() <= 1.0


def test_transfers_carry_their_source_and_train_under_the_target(ticket_store):
    rows = lineage(ticket_store).filter(pl.col("source_run_id").is_not_null())
    assert rows.height == 6 and set(rows["optimizer"]) == {"adam"}
    assert set(rows["condition"]) == {"adam"} and set(rows["level"]) == {1, 2}
    for ticket in rows.filter(pl.col("control").is_null()).iter_rows(named=True):
        source = ticket_store.run(ticket["source_run_id"])
        assert source["condition"] is None and source["optimizer"] == "sgd"
        assert source["control"] is None and source["level"] == ticket["level"]
        assert ticket["mask_id"] == source["mask_id"]
        assert ticket["init_seed"] == source["init_seed"]  # its weights are the source's
    view = ticket_store.sql("SELECT * FROM ticket_transfer ORDER BY level")
    assert view["level"].to_list() == [1, 2]
    for row in view.iter_rows(named=True):
        assert (row["source_condition"], row["target_condition"]) == ("base", "adam")
        for column in ("transferred", "transferred_reinit", "transferred_random_mask",
                       "target_ticket", "target_dense"):
            assert 0.2 < row[column] <= 1.0, column


def test_rebuild_adds_nothing(ticket_store):
    report = build_zoo(tickets_spec(), ticket_store, device="cpu")
    assert report.runs_built == 0 and report.runs_skipped == 32


class _Kill(Exception):
    pass


def test_resume_after_an_interrupted_multilevel_build(tmp_path, ticket_store):
    # the fixture's spec without transfer and stability copies: a subset of its runs, same ids
    text = TICKET_SPEC.split("[transfer]")[0].replace("stability = true", "")
    spec = tickets_spec("[build]\ncommit_every = 0\n", text=text)
    store = Store(tmp_path / "s", create=True)
    calls = []

    def kill_late(done: int, total: int) -> None:
        calls.append(done)
        if done > 0.9 * total:  # inside the last level, after some of it committed
            raise _Kill

    with pytest.raises(_Kill):
        build_zoo(spec, store, device="cpu", progress=kill_late)
    partial = store.sql("SELECT count(*) AS n, max(level) AS top FROM runs").row(0)
    assert 7 < partial[0] < 13 and partial[1] == 2  # the kill came inside the last level
    build_zoo(spec, store, device="cpu")
    assert verify(store).ok
    ids = store.sql("SELECT run_id FROM runs")["run_id"].to_list()
    assert len(ids) == len(set(ids)) == 13
    masks = store.sql("SELECT mask_id FROM masks")["mask_id"].to_list()
    assert len(masks) == 8
    got, want = store.load_masks(masks), ticket_store.load_masks(masks)
    for mask_id in masks:  # the same masks, bit for bit
        assert all(torch.equal(got[mask_id][k], want[mask_id][k]) for k in want[mask_id])
    keys = [(run_id, None) for run_id in ids]
    for a, b in zip(store.load_state_dicts(keys), ticket_store.load_state_dicts(keys)):
        # resumed cohorts hold other members, so float rounding may differ (as in
        # test_population); the result is the same run
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0)


def test_tickets_report_prints_tables_and_writes_figures(ticket_store, tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["tickets", "report", "--store", str(ticket_store.root),
                               "--plots", str(tmp_path), "--max-density", "0.7"])
    assert done.exit_code == 0, done.output
    text = done.output
    assert "final test accuracy by density" in text and "instability" in text
    assert "base, rewind 0, densities <= 70% (levels [2]): ticket" in text
    assert "beats its reinit control in" in text
    assert "level 2, density" in text and "adam" in text
    for name in ("tickets_density.png", "tickets_transfer.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    plain = runner.invoke(app, ["tickets", "report", "--store", str(tmp_path / "none")])
    assert isinstance(plain.exception, StoreError)  # printed in one line by dlstore.cli.main


def test_tickets_report_as_json_holds_every_table(ticket_store, tmp_path):
    import json

    runner = CliRunner()
    done = runner.invoke(app, ["tickets", "report", "--store", str(ticket_store.root),
                               "--plots", str(tmp_path), "--max-density", "0.7",
                               "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    frame = ticket_store.sql("SELECT DISTINCT level FROM tickets WHERE level > 0")
    assert {r["level"] for r in report["accuracy_by_density"]} == set(frame["level"])
    assert report["signatures"][0]["condition"] == "base" and report["instability"]
    assert {r["target_condition"] for r in report["transfer"]} >= {"adam"}
    assert sorted(report["figures"]) == sorted(str(tmp_path / n) for n in (
        "tickets_density.png", "tickets_transfer.png"))
    refused = runner.invoke(app, ["tickets", "report", "--store", str(ticket_store.root),
                                  "--format", "csv"])
    assert isinstance(refused.exception, UsageError)
