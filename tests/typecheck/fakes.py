"""Checked by mypy, never run: the tests' fake registries satisfy the protocols the library types them as.

``make lint`` and CI run ``mypy ckpt_stage tests/typecheck``; a fake that drifts from ``Registry`` (a
method renamed, a parameter gone) fails there instead of passing a test against a registry that no
longer exists.
"""

from __future__ import annotations

from ckpt_stage.orchestrate import SourceResolver, VersionLister, VersionReader
from ckpt_stage.registry import Registry
from tests.unit.dashboard_fakes import FakeRegistry as DashboardFakeRegistry
from tests.unit.test_orchestrate import FakeRegistry as OrchestrateFakeRegistry

orchestrate_fake: VersionReader = OrchestrateFakeRegistry({})
dashboard_fake: VersionLister = DashboardFakeRegistry()

# The real adapter satisfies them too: the protocols say nothing Registry does not.
real_reader: type[VersionReader] = Registry
real_resolver: type[SourceResolver] = Registry
