"""`dlstore import hf DIR`: checkpoint suites in the Hugging Face layout, in a local directory
(as a snapshot of Pythia's revisions is laid out).

A model is a directory of revision folders, each with `config.json` and `model.safetensors`
or `pytorch_model.bin` (read with `torch.load(weights_only=True)`): `step1000/`, `step2000/`,
... DIR is one model, or holds one model per subdirectory. A run per model (its id from the
model's directory name), a checkpoint per revision, the step parsed from the revision's name
(its last number: `step1000` -> 1000). Weights sharded over several files
(`model-00001-of-00002.safetensors`) are read and joined. The config is the last revision's
config.json (`hidden_size` -> width, `num_hidden_layers` -> depth), and the run rebuilds as the
registered `hf` architecture through `transformers` when that is installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from dlstore.importers.base import (
    ImportSourceError,
    SourceCheckpoint,
    SourceRun,
    last_number,
    read_state_dict,
    source_dirs,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _is_revision(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def model_dirs(root: Path) -> list[Path]:
    return source_dirs(root, lambda p: any(_is_revision(q) for q in p.iterdir()), "hf",
                       "revision folder (e.g. step1000/ with config.json and "
                       "model.safetensors or pytorch_model.bin)")


def read_source(root: Path, options: dict) -> tuple[int, Iterator[SourceRun]]:
    models = model_dirs(root)
    return len(models), (read_model(m) for m in models)


def read_model(model: Path) -> SourceRun:
    run = SourceRun(key=model.name, config={})
    revisions = []
    for folder in sorted(p for p in model.iterdir() if _is_revision(p)):
        step = last_number(folder.name)
        if step is None:
            run.error = (f"import hf: {folder}: no step in the revision's name (expected one, "
                         "as in step1000)")
            return run
        revisions.append((step, folder))
    revisions.sort()
    steps = [s for s, _ in revisions]
    if len(set(steps)) != len(steps):
        dup = next(s for s in steps if steps.count(s) > 1)
        run.error = f"import hf: {model} has two revisions of step {dup}"
        return run
    last = revisions[-1][1] / "config.json"
    try:
        hf_config = json.loads(last.read_text())
        if not isinstance(hf_config, dict):
            raise ValueError
    except (OSError, ValueError):
        run.error = f"import hf: {last} is not a JSON object"
        return run
    for step, folder in revisions:
        run.checkpoints.append(SourceCheckpoint(step, None, lambda f=folder: read_revision(f)))
    run.config = model_config(hf_config, model.name)
    return run


def model_config(hf_config: dict, name: str) -> dict:
    config: dict = {"source": name, "model": {"arch": "hf", "config": hf_config}}
    for key, column in (("hidden_size", "width"), ("num_hidden_layers", "depth")):
        if isinstance(hf_config.get(key), int):
            config[column] = hf_config[key]
    positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
    vocab = hf_config.get("vocab_size")
    if isinstance(positions, int) and isinstance(vocab, int):
        # token ids of the context length in, a distribution over the vocabulary out
        config["input_shape"] = [positions]
        config["n_classes"] = vocab
    return config


def read_revision(folder: Path) -> dict:
    """A revision's state dict, joined over its weight files."""
    files = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not files:
        files = sorted(folder.glob("model-*-of-*.safetensors")) or sorted(
            folder.glob("pytorch_model-*-of-*.bin"))
    if not files:
        raise ImportSourceError(f"import hf: {folder} has no {' or '.join(WEIGHT_FILES)}")
    state: dict = {}
    for path in files[:1] if files[0].name in WEIGHT_FILES else files:
        state.update(_read_weights(path))
    return state


def _read_weights(path: Path) -> dict:
    return read_state_dict(path, "import hf")
