"""Lottery tickets as phases of a zoo build.

A spec's `[tickets]` section makes each of its runs the root of iterative-magnitude-pruning
chains, one per rewind step; `[transfer]` adds runs that train those tickets under other
conditions. A build becomes phases: phase 0 trains the dense runs, phase k every run of level k
(tickets, their controls, stability copies, transfers). This module says

- which runs each phase holds, from the spec alone (`ticket_phases`), so that ticket run ids are
  stable hashes of their lineage and a rebuild knows what is missing;
- when a phase trains (`TicketPhase`), each member's mask and start weights, read back from the
  store: the previous level's trained weights and mask, the dense run's weights at the rewind
  step; and, once trained, the lineage columns of its runs rows and its masks rows;
- the instability of each ticket: the error barrier between it and a copy trained with another
  data order from the same weights (Frankle et al. 2020), recorded in `group_metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dlstore.datasets.base import run_data
from dlstore.errors import SpecError
from dlstore.experiments.base import Experiment, Phase, shard_runs
from dlstore.experiments.pruning import (
    Mask,
    density,
    full_mask,
    magnitude_prune,
    random_mask_like,
    tensor_densities,
)
from dlstore.ids import hashed_id
from dlstore.metrics.groups import record_stability
from dlstore.seeds import derive_seed, seed_for
from dlstore.spec import RunConfig, ZooSpec
from dlstore.store.writer import StoreWriter
from dlstore.training.plan import CohortPlan

BASE = "base"  # the condition of the spec's own runs


@dataclass(frozen=True)
class TicketRun(RunConfig):
    """A run of a ticket lineage: its config (what it trains on, how) plus where it comes from.

    `ticket_id` is its run id, a hash of its lineage; empty for the dense run of a transfer
    condition, whose id is that of its config like any dense run."""

    ticket_id: str = ""
    parent_run_id: str | None = None
    level: int = 0
    rewind_step: int = 0
    control: str | None = None  # None = the ticket itself; reinit | random_mask | order_copy
    condition: str | None = None  # transfer condition it trains under; None = the spec's own
    source_run_id: str | None = None  # transfers: the ticket they take mask and weights from
    dense_run_id: str | None = None  # whose weights at rewind_step it starts from
    prune_from: str | None = None  # whose trained weights (and mask) gave this level's mask
    chain_mask_id: str | None = None  # the mask magnitude pruning found at this level
    mask_id: str | None = None  # the mask it trains with (chain_mask_id, or its own random one)
    sibling_of: str | None = None  # controls and copies: the ticket (or dense run) they shadow

    @property
    def run_id(self) -> str:  # type: ignore[override]
        return self.ticket_id or hashed_id(self.zoo, self.canonical())

    @property
    def start_step(self) -> int:
        return self.rewind_step

    def checkpoint_steps(self, total_steps: int) -> list[int]:
        if self.rewind_step > total_steps:
            raise SpecError(f"tickets.rewind_steps: step {self.rewind_step} is past the last "
                            f"step ({total_steps}) of run {self.run_id}")
        steps = super().checkpoint_steps(total_steps)
        return sorted({self.rewind_step, *(s for s in steps if s > self.rewind_step)})

    def full(self) -> dict[str, Any]:
        return {**super().full(), "ticket": self.lineage()}

    def lineage(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "level": self.level,
                "rewind_step": self.rewind_step, "control": self.control,
                "condition": self.condition, "source_run_id": self.source_run_id,
                "dense_run_id": self.dense_run_id}


def mask_id_of(run_id: str) -> str:
    """The id of the mask a ticket (or random-mask control) found and owns."""
    return f"{run_id}-mask"


@dataclass(frozen=True)
class _Chain:
    """One IMP chain: a dense run, a rewind step, the condition it trains under."""

    index: int  # position of the spec run it derives from
    dense: RunConfig
    rewind_step: int
    condition: str
    control_levels: frozenset[int]
    stability: bool


def ticket_phases(spec: ZooSpec) -> list[list[RunConfig]]:
    """Every run of a tickets zoo, by phase: [dense runs, level-1 runs, ..., level-L runs]."""
    tickets, transfer = spec.tickets, spec.transfer
    assert tickets is not None
    levels = range(1, tickets.levels + 1)
    conditions = {BASE: list(spec.runs), **{name: list(runs) for name, runs in spec.conditions}}
    chains = [_Chain(i, run, r, BASE, frozenset(levels), tickets.stability)
              for i, run in enumerate(spec.runs) for r in tickets.rewind_steps]
    phases: list[list[RunConfig]] = [list(spec.runs)] + [[] for _ in levels]
    if transfer is not None:
        t_levels = frozenset(transfer.levels or levels)
        t_steps = transfer.rewind_steps or tickets.rewind_steps
        chosen = [i for i, run in enumerate(spec.runs)
                  if transfer.seeds is None or run.seed in transfer.seeds]
        if transfer.find_on_target:
            for name, runs in spec.conditions:
                for i in chosen:
                    dense = TicketRun(**_fields(runs[i]), condition=name)
                    phases[0].append(dense)
                    chains += [_Chain(i, dense, r, name, t_levels, False) for r in t_steps]
        sources = {c for c in chains if c.index in chosen and c.rewind_step in t_steps
                   and (transfer.all_pairs or c.condition == BASE)}
        targets = [name for name, _ in spec.conditions]
        if transfer.all_pairs:
            targets = [BASE, *targets] if transfer.find_on_target else targets
    pruning = tickets.pruning_key()
    for chain in chains:
        dense, r = chain.dense, chain.rewind_step
        base = _fields(dense, extra_checkpoints=())
        condition = None if chain.condition == BASE else chain.condition
        previous = dense.run_id
        if chain.stability:
            phases[1].append(_derived(base, "order_copy", parent=previous, level=0, rewind=r,
                                      condition=condition, dense=dense.run_id, prune_from=None,
                                      chain_mask=None, sibling_of=previous, pruning={}))
        for k in levels:
            ticket_id = hashed_id(spec.name, {"parent": previous, "level": k, "rewind_step": r,
                                              "pruning": pruning})
            common = {"level": k, "rewind_step": r, "dense_run_id": dense.run_id,
                      "prune_from": previous, "chain_mask_id": mask_id_of(ticket_id)}
            phases[k].append(TicketRun(**base, ticket_id=ticket_id, parent_run_id=previous,
                                       condition=condition, mask_id=mask_id_of(ticket_id),
                                       **common))
            kinds = list(tickets.controls) if k in chain.control_levels else []
            kinds += ["order_copy"] if chain.stability else []
            for kind in kinds:
                phases[k].append(_derived(base, kind, parent=previous, level=k, rewind=r,
                                          condition=condition, dense=dense.run_id,
                                          prune_from=previous, chain_mask=mask_id_of(ticket_id),
                                          sibling_of=ticket_id, pruning=pruning))
            if transfer is not None and chain in sources and k in t_levels:
                for target in targets:
                    if target == chain.condition:
                        continue
                    phases[k] += _transfers(spec, conditions[target][chain.index], target,
                                            ticket_id, dense, common, transfer.controls)
            previous = ticket_id
    return phases


def _fields(run: RunConfig, **changes) -> dict[str, Any]:
    """The RunConfig fields of `run` (a TicketRun's lineage left out), with `changes`."""
    names = [f.name for f in dataclasses.fields(RunConfig)]
    return {**{n: getattr(run, n) for n in names}, **changes}


def _derived(base: dict[str, Any], kind: str, *, parent: str, level: int, rewind: int,
             condition: str | None, dense: str, prune_from: str | None, chain_mask: str | None,
             sibling_of: str, pruning: dict, transfer: dict | None = None) -> TicketRun:
    """A control (reinit, random_mask) or stability copy (order_copy) of a ticket."""
    payload = {"parent": parent, "level": level, "rewind_step": rewind, "control": kind,
               "pruning": pruning, **({"transfer": transfer} if transfer else {})}
    run_id = hashed_id(base["zoo"], payload)
    fields = dict(base)
    purpose = f"{kind}:{run_id}"
    if kind == "reinit":  # the same mask on a fresh initialisation
        fields["model"] = base["model"].model_copy(
            update={"init_seed": derive_seed(base["seed"], purpose)})
    elif kind == "order_copy":  # the same start, another data order
        fields["train"] = base["train"].model_copy(
            update={"order_seed": derive_seed(base["seed"], purpose)})
    return TicketRun(**fields, ticket_id=run_id, parent_run_id=parent, level=level,
                     rewind_step=rewind, control=kind, condition=condition,
                     source_run_id=transfer["source"] if transfer else None, dense_run_id=dense,
                     prune_from=prune_from, chain_mask_id=chain_mask,
                     mask_id=mask_id_of(run_id) if kind == "random_mask" else chain_mask,
                     sibling_of=sibling_of)


def _transfers(spec: ZooSpec, target: RunConfig, name: str, ticket_id: str, dense: RunConfig,
               common: dict[str, Any], controls: Iterable[str]) -> list[TicketRun]:
    """The ticket `ticket_id` (found on `dense`'s chain) trained under condition `name`, and its
    controls there."""
    transfer = {"source": ticket_id, "target": name, "config": target.canonical()}
    # the ticket's weights come from the source run: its init seed is the source's
    source_init = seed_for(dense.model.init_seed, dense.seed, "init")
    base = _fields(target, extra_checkpoints=(),
                   model=target.model.model_copy(update={"init_seed": source_init}))
    run_id = hashed_id(spec.name, {"parent": ticket_id, "level": common["level"],
                                   "rewind_step": common["rewind_step"], "transfer": transfer})
    out = [TicketRun(**base, ticket_id=run_id, parent_run_id=ticket_id, condition=name,
                     source_run_id=ticket_id, mask_id=common["chain_mask_id"], **common)]
    for kind in controls:
        out.append(_derived(base, kind, parent=ticket_id, level=common["level"],
                            rewind=common["rewind_step"], condition=name,
                            dense=common["dense_run_id"], prune_from=common["prune_from"],
                            chain_mask=common["chain_mask_id"], sibling_of=run_id, pruning={},
                            transfer=transfer))
    return out


def check_transfer_shapes(spec: ZooSpec) -> None:
    """A transferred ticket keeps its network: every target condition must give inputs of the
    source's shape and the same number of classes."""
    for name, runs in spec.conditions:
        for source, target in zip(spec.runs, runs):
            a, b = run_data(source.dataset, source.seed), run_data(target.dataset, target.seed)
            if (a.input_shape, a.n_classes) != (b.input_shape, b.n_classes):
                raise SpecError(
                    f"transfer.targets.{name}: its dataset gives inputs of shape "
                    f"{list(b.input_shape)} and {b.n_classes} classes, the tickets' "
                    f"{list(a.input_shape)} and {a.n_classes}; a transferred ticket keeps its "
                    "network")


class Tickets(Experiment):
    """A tickets zoo: phase 0 trains the dense runs, phase k every run of level k.

    Every run derives from one dense run (`dense_run_id`: its chain's; a dense run is its own),
    and reads only what runs of that dense run stored. So a shard is a block of the dense runs
    with every run derived from them, and shards build independently (`--shard`); each phase's
    cohorts read the store themselves, so they run as Ray tasks too."""

    def __init__(self, spec: ZooSpec):
        assert spec.tickets is not None
        super().__init__(spec)
        self._phases = ticket_phases(spec)

    def phases(self, shard: tuple[int, int] | None = None) -> list[list[RunConfig]]:
        if shard is None:
            return [list(phase) for phase in self._phases]
        dense = {run.run_id for run in shard_runs(self._phases[0], *shard)}
        return [[run for run in phase
                 if (getattr(run, "dense_run_id", None) or run.run_id) in dense]
                for phase in self._phases]

    def zoo_runs(self) -> int:
        return sum(map(len, self._phases))

    def check(self) -> None:
        if self.spec.transfer is not None:
            check_transfer_shapes(self.spec)

    def phase(self, index: int, writer: StoreWriter) -> TicketPhase:
        return TicketPhase(self.spec, writer)

    def after_phase(self, writer: StoreWriter, phases: list[list[RunConfig]]) -> None:
        record_stability(writer, stability_pairs(phases))


class TicketPhase(Phase):
    """One phase of a tickets build: start weights and masks of its members (read back from the
    store), then the lineage columns and masks rows of what it trained."""

    def __init__(self, spec: ZooSpec, writer: StoreWriter):
        assert spec.tickets is not None
        self.options = spec.tickets
        self.writer = writer
        self.store = writer.store
        self._masks: dict[str, Mask] = {}
        self._rewound: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._members: dict[str, Mask | None] = {}

    def prepare(self, plan: CohortPlan, runs: list[RunConfig]) -> None:
        """Give each member of `plan` its mask and start weights (rewound, or its own fresh init
        for reinit controls); the trainer zeroes what the mask prunes."""
        derived = [run for run in runs if isinstance(run, TicketRun)
                   and not (run.level == 0 and run.control is None)]
        self._read([run for run in derived if run.level > 0],
                   {(run.dense_run_id, run.rewind_step) for run in derived
                    if run.control != "reinit"})
        for member, run in zip(plan.members, runs):
            mask = self.mask(run)
            self._members[run.run_id] = mask
            if run not in derived:
                continue
            member.mask = mask
            if run.control != "reinit":
                rewound = self._rewound[(run.dense_run_id, run.rewind_step)]
                if {k: v.shape for k, v in rewound.items()} != {
                        k: v.shape for k, v in member.init.items()}:
                    raise SpecError(f"run {run.run_id}: the weights of {run.dense_run_id} at "
                                    f"step {run.rewind_step} do not fit its network")
                member.init = rewound

    def _read(self, masked: list[TicketRun], rewinds: set[tuple[str, int]]) -> None:
        """Bring in, with a few bulk reads, this level's masks (the stored ones of committed
        tickets, else pruned from the previous level's stored weights and mask) and the
        weights to rewind to."""
        wanted = sorted({run.chain_mask_id for run in masked} - set(self._masks))
        stored = set(self.store.sql("SELECT mask_id FROM masks WHERE list_contains(?, mask_id)",
                                    [wanted])["mask_id"]) if wanted else set()
        self._masks |= self.store.load_masks(sorted(stored)) if stored else {}
        prune = {run.chain_mask_id: run for run in masked if run.chain_mask_id not in self._masks}
        previous = self.store.load_masks([mask_id_of(run.prune_from) for run in prune.values()
                                          if run.level > 1]) if prune else {}
        keys = [(run.prune_from, None) for run in prune.values()]
        keys += sorted(rewinds - set(self._rewound))
        states = dict(zip(keys, self.store.load_state_dicts(keys))) if keys else {}
        o = self.options
        for key, run in prune.items():
            weights = states[(run.prune_from, None)]
            before = (full_mask(weights, run.model) if run.level == 1
                      else previous[mask_id_of(run.prune_from)])
            self._masks[key] = magnitude_prune(before, weights, o.prune_fraction,
                                               o.output_fraction, o.scope)
        self._rewound |= {k: states[k] for k in rewinds if k not in self._rewound}

    def mask(self, run: RunConfig) -> Mask | None:
        if not isinstance(run, TicketRun) or run.level == 0:
            return None
        chain = self._masks[run.chain_mask_id]
        if run.control != "random_mask":
            return chain
        if run.mask_id not in self._masks:
            seed = derive_seed(run.seed, f"random_mask:{run.run_id}")
            self._masks[run.mask_id] = random_mask_like(chain, seed)
        return self._masks[run.mask_id]

    def finish(self, rows: tuple[list[dict], dict[str, list], list[dict]], runs: list[RunConfig],
               zoo: str) -> tuple[list[dict], dict[str, list], list[dict], list[dict]]:
        """The cohort's rows with lineage columns on its runs rows, plus its masks rows (the
        masks it found, written to a shard of their own)."""
        checkpoints, metrics, run_rows = rows
        for row, run in zip(run_rows, runs):
            row.update(lineage_columns(run, self._members.get(run.run_id)))
        owners = [run for run in runs if isinstance(run, TicketRun) and run.mask_id is not None
                  and run.mask_id == mask_id_of(run.run_id)]
        return checkpoints, metrics, run_rows, self._mask_rows(owners, zoo)

    def _mask_rows(self, owners: list[TicketRun], zoo: str) -> list[dict]:
        groups: dict[tuple, list[TicketRun]] = {}
        for run in owners:
            shapes = tuple((k, tuple(v.shape)) for k, v in self._members[run.run_id].items())
            groups.setdefault(shapes, []).append(run)
        rows = []
        for members in groups.values():
            masks = [self._members[run.run_id] for run in members]
            tensors = {k: torch.stack([m[k].cpu() for m in masks]) for k in masks[0]}
            blob = self.writer.put_mask_shard(tensors, zoo=zoo,
                                              mask_ids=[run.mask_id for run in members],
                                              run_ids=[run.run_id for run in members])
            for position, (run, mask) in enumerate(zip(members, masks)):
                rows.append({"mask_id": run.mask_id, "run_id": run.run_id, "level": run.level,
                             "density": density(mask), "rewind_step": run.rewind_step,
                             "blob": blob, "member": position, "tensor_names": list(mask),
                             "tensor_densities": tensor_densities(mask)})
        return rows


def lineage_columns(run: RunConfig, mask: Mask | None) -> dict[str, Any]:
    """The runs-table columns of a tickets zoo's run (dense runs: level 0, density 1)."""
    if not isinstance(run, TicketRun):
        return {"level": 0, "density": 1.0}
    dense = run.level == 0 and run.control is None
    return {"parent_run_id": run.parent_run_id, "level": run.level,
            "density": 1.0 if mask is None else density(mask), "mask_id": run.mask_id,
            "rewind_step": None if dense else run.rewind_step, "control": run.control,
            "condition": run.condition, "source_run_id": run.source_run_id}


def stability_pairs(phases: list[list[RunConfig]]) -> list[tuple[str, str]]:
    """(ticket or dense run, its copy trained from the same weights with another data order),
    as run ids."""
    return [(run.sibling_of, run.run_id) for phase in phases for run in phase
            if isinstance(run, TicketRun) and run.control == "order_copy"]
