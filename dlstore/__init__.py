"""dlstore: a data-centric artifact store and query toolkit for populations of trained networks.

    import dlstore
    store = dlstore.open("dlstore-store")
    store.sql("SELECT width, avg(value) FROM final WHERE metric = 'test_acc' GROUP BY width")
    model = store.load_model(run_id)            # a torch.nn.Module, ready to call

Extension points (README, "Extending dlstore"): subclass `dlstore.Architecture`,
`dlstore.Dataset` or `dlstore.MetricFamily` and name the class in a spec by import path or entry
point.
"""

__version__ = "0.1.0"

from dlstore.errors import DlstoreError  # noqa: E402
from dlstore.store.store import Store, open  # noqa: E402,A004

# The plugin bases need torch; importing them on first use keeps `import dlstore` fast.
_LAZY = {
    "Architecture": "dlstore.architectures.base",
    "Dataset": "dlstore.datasets.base",
    "DatasetTensors": "dlstore.datasets.base",
    "MetricFamily": "dlstore.metrics.families",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dlstore' has no attribute {name!r}")


__all__ = ["Architecture", "Dataset", "DatasetTensors", "DlstoreError", "MetricFamily", "Store",
           "open", "__version__"]
