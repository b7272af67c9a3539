"""Torch-agnostic isolation of the worker: ``job`` (what crosses the process boundary), ``forkserver``
(an import-only server that forks one worker per job), ``child`` (supervisor → init → loader: namespaces,
private root, cgroup, own uid, rlimits, seccomp), ``isolation`` (the primitives) and ``runner`` (the
parent side: lifecycle, limits, result schema, outcome). What runs inside the worker is ``ckpt_stage.load``.
"""
