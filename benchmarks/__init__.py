"""fpt_fast benchmarks: kernels, frozen-branch extraction, training steps, and a report renderer.

Every script writes rows keyed by (op, provider, mode, shape, dtype, device) into one
``results.json`` per output folder (see benchmarks.common); ``python -m benchmarks.report DIR``
renders it. ``--smoke`` runs each script on the CPU at tiny sizes (CI keeps the harness alive);
those timings are CPU timings and are labelled so in every row.
"""
