"""Training a cohort: many runs stacked on a member axis, trained as one (`cohort`), with the
stacked optimizer, the sampler and the schedules; and the plain reference loop they must match."""
