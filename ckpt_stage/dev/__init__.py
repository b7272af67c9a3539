"""Dev tooling, not the stage: the local stack (``devstack``), the demo (``demo``) and sample model versions
for tests and the demo (``samples``). The core never imports this package."""
