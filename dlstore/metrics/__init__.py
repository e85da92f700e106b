"""Metrics: the measurements (basic, weights, spectra, hessian, collapse, similarity,
connectivity), the metric-family registry a spec's [metrics] names (`families`), evaluation at
checkpoints (`evaluate`), group metrics after a build (`groups`) and backfill."""
