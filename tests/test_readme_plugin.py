"""The README's "Extending dlstore" example, run as written: its plugin file, its spec and its
commands."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from dlstore.store.store import Store

README = Path(__file__).resolve().parent.parent / "README.md"


def section_blocks() -> list[tuple[str, str]]:
    text = README.read_text().split("\n## Extending dlstore\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def test_the_readme_plugin_example_builds_queries_and_reloads(tmp_path, monkeypatch):
    blocks = section_blocks()
    (python,) = [body for lang, body in blocks if lang == "python"]
    (spec,) = [body for lang, body in blocks if lang == "toml" and body.startswith("name =")]
    (commands,) = [body for lang, body in blocks if lang == "" and "build-zoo" in body]
    (tmp_path / "my_plugin.py").write_text(python)
    (tmp_path / "rings.toml").write_text(spec)
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                                  os.environ["PATH"]])}
    out = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.search(r"\b8\b", out.stdout) and re.search(r"\b16\b", out.stdout)

    monkeypatch.syspath_prepend(str(tmp_path))
    store = Store(tmp_path / "rings-store")
    final = store.sql("SELECT run_id, width, value FROM final WHERE metric = 'test_acc'"
                      ).to_dicts()
    assert sorted(r["width"] for r in final) == [8, 8, 16, 16]
    assert store.sql("SELECT count(*) AS n FROM metrics WHERE metric = 'test_confidence'"
                     ).to_dicts()[0]["n"] == 4 * 3
    for row in final:
        model = store.load_model(row["run_id"])
        data = store.load_dataset(row["run_id"])
        with torch.no_grad():
            acc = (model(data["x_test"]).argmax(1) == data["y_test"]).double().mean().item()
        assert abs(acc - row["value"]) < 1e-9
