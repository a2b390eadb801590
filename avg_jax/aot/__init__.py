"""Ahead-of-time TPU compile checks: `avg-jax compile --config C --topology v5e:4x4`.

Lowers and compiles the tokenizer, generative, LTR and search steps for a named TPU topology on
any host with the optional libtpu extra, and reports per-device memory and FLOPs
(`command.run`). Modules: `topology` (names, chip specs, abstract devices), `programs` (the
stages' jitted steps with abstract inputs), `analysis` (compile, measure, table).
"""
