"""dlstore: a data-centric artifact store and query toolkit for populations of trained networks.

    import dlstore
    store = dlstore.open("dlstore-store")
    store.sql("SELECT width, avg(value) FROM final WHERE metric = 'test_acc' GROUP BY width")
    model = store.load_model(run_id)            # a torch.nn.Module, ready to call
"""

__version__ = "0.1.0"

from dlstore.errors import DlstoreError  # noqa: E402
from dlstore.store.store import Store, open  # noqa: E402,A004

__all__ = ["DlstoreError", "Store", "open", "__version__"]
