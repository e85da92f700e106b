"""Importers: runs trained elsewhere, brought into a store as rows of the same tables.

- `runs`: tracked-run directories (`dlstore import-runs`, through `Store.track`);
- `raytune`, `unterthiner`, `hf`, `csv`: published zoos in their own layouts (`dlstore
  import FORMAT PATH`), each a reader of its files; `base` commits what they read with the
  build's commit protocol; `registry` maps format names to readers (`import_zoo`).
"""

from dlstore.importers.registry import FORMATS, import_zoo

__all__ = ["FORMATS", "import_zoo"]
