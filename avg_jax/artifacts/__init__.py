"""Artifacts: what the stages hand on to each other on disk, and how it is written.

    paths.py         where each stage writes inside a workdir
    io.py            atomic writes of files and folders (whole or not at all); a full disk
    npz_writer.py    large `.npz` files with bounded memory
    checksums.py     `checksums.json`: size and SHA-256 of every file of a folder
    checkpoints.py   orbax checkpoints: train state, iterator state, metadata, final parameters
    fingerprint.py   whether a stage's output is complete and made from these inputs
    stage_inputs.py  the config keys each stage reads (what its output is made from)
    locks.py         one owner per workdir stage
    embeddings.py    the embed stage's hand-over
    voken_tables.py  the tokenize stage's hand-over
    exports.py       the export stage's hand-over: the serving checkpoint's folder and manifest

Part of the foundation (tests/test_package_layout.py): plain data and files; it imports other
foundation modules only, never a library of the pipeline.
"""
