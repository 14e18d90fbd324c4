"""The application layer, built on fpt_fast.model and fpt_fast.ops (nothing below imports it):

    settings      run settings: YAML file + --set overrides, checked key by key
    data          images, transforms, datasets, the DataLoader factory, the bad-image policy
    store         the feature store's file format, reader, writer and checks
    files         atomic file writes, the CSV writer, and the checks that keep files safe (full disk,
                  outputs that exist, folders that are files, stale temporaries, torch files)
    console       the log callable and progress bars
    build         what every job builds from its settings (model, placement, normalisation, store check)
    checkpoints   the checkpoint format, save/load, and the checks of a checkpoint against a run
    preloading    the preload job (frozen branch -> feature store) and the store's verification
    training      the Trainer and train()
    evaluation    evaluate(), predict() and the forward of a batch
    explain       explain(): per image, importance heatmaps and kept tokens as PNG figures and .npy maps
    metrics       classification metrics, PPE and PME
    distributed   torchrun processes: process group, devices, collectives
    cli, demo     the fpt-fast command line and its self-contained demo
    environment_report  the reports of ``python -m fpt_fast.info`` (fpt_fast/info.py)
"""
