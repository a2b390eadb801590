"""The pipeline's stages, one thin module each, in order:

    prepare -> embed -> tokenize -> train -> rank -> evaluate -> export

Each has `run(config, workdir)`: it reads what earlier stages left in the workdir (the
artifacts, avg_jax/artifacts), wires the libraries below (data, encoders, tokenizer, models,
decoding, training, evaluation, inference, export) and writes its own output folder with a
fingerprint.
Libraries never import a stage; a stage may run an earlier one (evaluate runs the tokenize,
train and rank stages of its ablations). `avg-jax STAGE` and `avg-jax run` call them
(avg_jax/cli/). One run owns a stage of a workdir at a time (avg_jax/artifacts/locks.py): a
second one stops with the owner named.
"""

PIPELINE = ("prepare", "embed", "tokenize", "train", "rank", "evaluate", "export")
