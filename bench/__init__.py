"""Benchmarks: each module is a script, run from the repository root as
`python -m bench.NAME [options]` (docs/benchmarks.md lists the commands and figures).

They import only the public names of the five packages; the gloo worlds come from
`parallelism.worlds` and the controller helpers from `controller.testing`.
"""
