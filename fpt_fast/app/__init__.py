"""The application layer: run settings, image data, the feature store, checkpoints, training,
evaluation, prediction, the fpt-fast command line and its demo. Built on fpt_fast.model and
fpt_fast.ops; nothing below imports it."""
