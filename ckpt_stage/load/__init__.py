"""What runs inside the isolated worker: loading each format as the scan's reading describes it, and the
checks on what was loaded. Imports torch; never imported by the parent's scan.

``loader.load_and_check(job)`` is the worker's entry (``sandbox.runner`` forks a worker for it); the
format-specific parts live beside it: ``safe_torch`` (weights-only loading under the allowlist),
``pt2`` (torch.export archives, after their program JSON passed ``scan.pt2``), ``mlflow_model``
(MLflow model directories), ``hf`` (Hugging Face folders built on the meta device), and ``checks``
(architecture, shapes, dtypes, finite values, smoke output, library versions).
"""
