"""Every command of the CLI, found from the typer app (a new command is covered the day it is
added), driven with bad input: an unknown store, bad option values, missing files, unknown run
ids, bad SQL. Each must exit non-zero with one line on stderr and no traceback or Rust panic."""

import shutil

import pytest
import typer

from dlstore.cli import app
from tests.conftest import TINY_SPEC
from tests.test_cli_output import cli


def _commands(group, path=()):
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands(typer.main.get_command(app)))


def _kind(param) -> str:
    """What help shows as the parameter's type: <int>, <float range>, <path>, <a|b|c>."""
    return (param.display_type_rich(ctx=None) or "").lower()


def _takes_numbers_or_choices(param) -> bool:
    kind = _kind(param)
    return "int" in kind or "float" in kind or "|" in kind


def _is_path(param) -> bool:
    return _kind(param) == "<path>"


@pytest.fixture(scope="module")
def places(tmp_path_factory, built_store):
    root = tmp_path_factory.mktemp("sweep")
    store = root / "store"
    shutil.copytree(built_store.root, store)
    (root / "spec.toml").write_text(TINY_SPEC)
    (root / "afile").write_text("not a directory, not a store")
    (root / "out").mkdir()
    return {"store": str(store), "spec": str(root / "spec.toml"),
            "not_a_store": str(root / "afile"),
            # under a regular file: nothing can be read or created there
            "missing": str(root / "afile" / "missing.toml"),
            "out": str(root / "out"), "run_id": sorted(built_store.run_ids())[0]}


def _value(param, places) -> list[str]:
    """A plausible value for a required parameter (what a mutation leaves alone)."""
    name = param.name
    if name in ("run_id", "run_ids"):
        return [places["run_id"]]
    if name == "spec":
        return [places["spec"]]
    if name == "query":
        return ["SELECT run_id, step, n_params AS N, n_train AS D, 1.0 AS loss "
                "FROM checkpoints JOIN runs USING (run_id) WHERE width = 8"]
    if name in ("x", "y"):
        return ["lr" if name == "x" else "width"]
    if name == "metric":
        return ["test_acc"]
    if name in ("out_path", "out_dir"):
        return [places["out"] + ("/x.pt" if name == "out_path" else "")]
    return ["1"]


def _argv(path, command, places, replace=None):
    """Command path + its required parameters (+ --store), with `replace` = {param name:
    values} swapped in (an option not required is added)."""
    replace = replace or {}
    args, options = [*path], []
    for param in command.params:
        wanted = param.name in replace
        # run ids and queries: optional in form (rm --zoo, sql --file), given here
        given = param.required or wanted or param.name in ("run_ids", "query")
        if not given or param.name == "store":
            continue
        values = replace.get(param.name) or _value(param, places)
        if param.param_type_name == "argument":
            args += values
        else:
            options += [param.opts[0], *values]
    store = replace.get("store", [places["store"]])
    return [*args, *options, "--store", *store]


def _cases(path, command, places):
    names = {p.name: p for p in command.params}
    yield "unknown store", _argv(path, command, places, {"store": [places["not_a_store"]]})
    for param in command.params:
        if param.param_type_name == "option" and not param.is_flag and param.name not in (
                "store", "storage_option") and _takes_numbers_or_choices(param):
            yield f"bad {param.opts[0]}", _argv(path, command, places, {param.name: ["bogus"]})
        if _is_path(param):
            yield f"missing {param.name}", _argv(path, command, places,
                                                 {param.name: [places["missing"]]})
    if "run_id" in names or "run_ids" in names:
        key = "run_id" if "run_id" in names else "run_ids"
        yield "unknown run", _argv(path, command, places, {key: ["no-such-run"]})
    if "query" in names:
        yield "bad sql", _argv(path, command, places, {"query": ["SELEC nonsense FROM"]})
    yield "unknown option", [*_argv(path, command, places), "--no-such-option"]


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_bad_input_is_one_line_without_traceback(capsys, places, path, command):
    cases = list(_cases(path, command, places))
    assert len(cases) >= 2
    # what the error names, where the case says for sure
    names = {"unknown store": places["not_a_store"], "unknown run": "no-such-run",
             "bad sql": "syntax error", "unknown option": "--no-such-option"}
    for what, argv in cases:
        code, _, err = cli(capsys, *argv)
        assert code != 0, (what, argv)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, argv, err)
        assert "Traceback" not in err and "panicked" not in err, (what, argv, err)
        assert names.get(what, "") in err or what.startswith("bad --"), (what, argv, err)


def test_the_sweep_sees_every_command():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"sql", "runs", "show", "zoos", "rm", "export", "tag", "fit scaling",
            "plot grokking", "wsl fit", "build-zoo", "metrics compute"} <= names
