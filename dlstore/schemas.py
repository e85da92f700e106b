"""The Arrow schema of every table: the single source of truth for what the store holds.

Tables are appended to, never updated in place. Rows written by one cohort commit share a
`commit_id`; the views in `store/catalog.py` show metric and checkpoint rows only when the run's
`runs` row (written last) carries the same commit id, so rows left by an interrupted commit, or by
a build that was rerun after a crash, are never visible.
"""

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

ZOOS = pa.schema([
    ("zoo", pa.string()),
    ("spec", pa.string()),          # the TOML text as given
    ("spec_hash", pa.string()),     # sha256 of the text
    ("n_runs", pa.int64()),
    ("created_at", TS),
    ("dlstore_version", pa.string()),
    # imported zoos (`dlstore import`): where from, and what the zoo held after the import
    ("source_format", pa.string()),  # raytune | unterthiner | hf | csv; null for a built zoo
    ("source_path", pa.string()),
    ("n_checkpoints", pa.int64()),
    ("n_metric_rows", pa.int64()),
])

RUNS = pa.schema([
    ("run_id", pa.string()),
    ("zoo", pa.string()),
    ("status", pa.string()),        # complete | diverged; tracked: running | complete | failed
    ("arch", pa.string()),
    ("dataset", pa.string()),
    ("width", pa.int64()),
    ("depth", pa.int64()),
    ("n_params", pa.int64()),
    ("n_train", pa.int64()),
    ("label_noise", pa.float64()),
    ("optimizer", pa.string()),
    ("lr", pa.float64()),
    ("momentum", pa.float64()),     # null for adam
    ("weight_decay", pa.float64()),
    ("batch_size", pa.int64()),
    ("schedule", pa.string()),
    ("epochs", pa.int64()),         # null when the spec gives steps
    ("total_steps", pa.int64()),
    ("seed", pa.int64()),
    ("init_seed", pa.int64()),
    ("order_seed", pa.int64()),
    ("noise_seed", pa.int64()),
    ("n_classes", pa.int64()),
    ("input_shape", pa.list_(pa.int64())),
    ("config", pa.string()),        # the full run config as JSON, defaults spelled out
    ("final_step", pa.int64()),     # last checkpoint step with weights (before divergence)
    ("diverged_step", pa.int64()),  # step whose loss was NaN/inf; null if none
    ("parent_run_id", pa.string()),  # lottery tickets: the run this one was derived from
    ("level", pa.int64()),          # pruning level; 0 = the dense reference; null outside tickets
    ("density", pa.float64()),      # fraction of prunable weights kept (1.0 when dense)
    ("mask_id", pa.string()),       # the mask it trained with (table masks); null when dense
    ("rewind_step", pa.int64()),    # step of the dense run it started from (0 = its init)
    ("control", pa.string()),       # null for tickets; reinit | random_mask | order_copy
    ("condition", pa.string()),     # transfer condition it trained under; null = the spec's own
    ("source_run_id", pa.string()),  # transfers: the ticket whose mask and weights it took
    ("cohort_id", pa.string()),
    ("commit_id", pa.string()),
    ("spec_hash", pa.string()),     # the spec it was built from (zoos.spec_hash)
    ("data_hash", pa.string()),     # fingerprint of the exact tensors the run used
    ("device", pa.string()),
    ("train_seconds", pa.float64()),  # the cohort's training time, split evenly over members
    ("created_at", TS),
    ("dlstore_version", pa.string()),
    ("torch_version", pa.string()),
])

CHECKPOINTS = pa.schema([
    ("run_id", pa.string()),
    ("step", pa.int64()),
    ("epoch", pa.float64()),
    ("blob", pa.string()),          # sha256 of the shard file
    ("member", pa.int32()),         # index along the shard's leading axis
    ("dtype", pa.string()),
    ("n_bytes", pa.int64()),        # bytes of this member's tensors
    ("commit_id", pa.string()),
])

METRICS = pa.schema([
    ("run_id", pa.string()),
    ("step", pa.int64()),
    ("metric", pa.string()),
    ("tensor", pa.string()),        # state-dict name for per-tensor metrics; null otherwise
    ("value", pa.float64()),
    ("commit_id", pa.string()),
])

FITS = pa.schema([
    ("fit_id", pa.string()),
    ("kind", pa.string()),          # power_law | chinchilla | wsl
    ("query", pa.string()),         # the SQL that selected the points
    ("params", pa.string()),        # JSON: E, A, alpha (, B, beta); wsl: model, features,
                                    # target, kendall_tau, r2 / accuracy, split sizes
    ("ci", pa.string()),            # JSON: name -> [low, high]
    ("ci_level", pa.float64()),
    ("objective", pa.float64()),    # minimised sum of Huber losses
    ("n", pa.int64()),              # points fitted
    ("created_at", TS),
    ("dlstore_version", pa.string()),
    ("label", pa.string()),         # names the fit; a re-run of a label replaces it in the view
    ("warnings", pa.list_(pa.string())),  # what makes the fit doubtful (one line each)
])

MASKS = pa.schema([
    ("mask_id", pa.string()),
    ("run_id", pa.string()),        # the run that trained with it first (a ticket or control)
    ("level", pa.int64()),
    ("density", pa.float64()),      # kept / prunable, over all prunable tensors
    ("rewind_step", pa.int64()),
    ("blob", pa.string()),          # shard of bool tensors [P, ...], one per prunable tensor
    ("member", pa.int32()),
    ("tensor_names", pa.list_(pa.string())),       # the prunable tensors, in state-dict order
    ("tensor_densities", pa.list_(pa.float64())),  # kept / size of each
    ("commit_id", pa.string()),
])

# Metrics of a group of runs: the seeds of one config (mode connectivity, CKA, disagreement).
GROUP_METRICS = pa.schema([
    ("group_id", pa.string()),      # <zoo>-g<hash of the shared config and the member run ids>
    ("zoo", pa.string()),
    ("run_ids", pa.list_(pa.string())),  # the group's members (complete runs), sorted by seed
    ("group_key", pa.string()),     # JSON of the config the members share (all but the seed)
    ("step", pa.int64()),
    ("metric", pa.string()),
    ("value", pa.float64()),        # mean over the pairs of members compared
    ("created_at", TS),
])

# Runs hidden by `dlstore rm`: a run's rows created at or before `removed_at` leave every view
# (a later rebuild of the run shows again). run_id null: the whole zoo's spec rows as well.
REMOVED = pa.schema([
    ("run_id", pa.string()),
    ("zoo", pa.string()),
    ("removed_at", TS),
    ("commit_id", pa.string()),     # one per `rm`: the rows it wrote share it
])

# Tags and notes on runs (`dlstore tag`): the latest value of a (run_id, key) wins; an empty
# value removes the tag.
TAGS = pa.schema([
    ("run_id", pa.string()),
    ("key", pa.string()),
    ("value", pa.string()),
    ("created_at", TS),
])

# Status updates of tracked runs (`Store.track`): running (with a heartbeat at every flush),
# then complete | failed. The runs view shows each run's latest; a `running` update older than
# the tracker's stale age shows as `died`.
RUN_UPDATES = pa.schema([
    ("run_id", pa.string()),
    ("status", pa.string()),        # running | complete | failed
    ("final_step", pa.int64()),     # the last step logged so far
    ("error", pa.string()),         # failed: the exception's type and text
    ("created_at", TS),
])

TABLES: dict[str, pa.Schema] = {
    "zoos": ZOOS,
    "runs": RUNS,
    "checkpoints": CHECKPOINTS,
    "metrics": METRICS,
    "fits": FITS,
    "masks": MASKS,
    "group_metrics": GROUP_METRICS,
    "removed": REMOVED,
    "tags": TAGS,
    "run_updates": RUN_UPDATES,
}

# The order rows are written in, per table, within each file: a query that filters on the
# leading columns skips the row groups whose statistics rule them out (DuckDB reads min/max per
# row group). Nearly every metrics query names a metric, and `final` joins on each run's last
# step, so metric rows go by metric, then step; a flush of 100,000 tracked rows then leaves
# most row groups holding one metric.
CLUSTER_BY: dict[str, tuple[str, ...]] = {
    "metrics": ("metric", "step", "run_id"),
}
# rows per Parquet row group: small enough that a file of one flush holds several, so the
# statistics above can rule some out
ROW_GROUP_ROWS = 16_384

# Run columns that describe what was trained: joined onto metric rows by the `final` and
# `curves` views so that a query can group by them directly.
HYPERPARAMETER_COLUMNS = (
    "run_id", "zoo", "status", "arch", "dataset", "width", "depth", "n_params", "n_train",
    "label_noise", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "schedule",
    "epochs", "total_steps", "seed", "level", "density", "rewind_step", "control", "condition",
)
