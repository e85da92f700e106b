"""An architecture, a dataset and a metric family that live outside dlstore (tests/test_plugins)."""
