"""The registry: the only code that talks to MLflow (``adapter``) and the tag schema it writes (``tags``).

``from ckpt_stage.registry import Registry, STATUS, VersionState, ...`` keeps working: the names are
re-exported here.
"""

from ckpt_stage.registry.adapter import (
    PAGE,
    REPORT_CACHE,
    Registry,
    _prompt_check_once,
    _quote,
    configure_client,
    default_owner,
    translate,
)
from ckpt_stage.registry.tags import (
    ARCH,
    ARCH_KWARGS,
    ATTEMPT,
    ATTEMPT_ID,
    LEASE_OWNER,
    LEASE_UNTIL,
    MANIFEST_SHA256,
    REASONS,
    RUN_ID,
    RUN_MODEL,
    RUN_VERSION,
    SHA256,
    STATUS,
    SUMMARY,
    TAG,
    VALIDATED_AT,
    VERDICT,
    VersionState,
    iso,
    iso_ms,
    now_utc,
    parse_iso,
)

__all__ = [
    "ARCH", "ARCH_KWARGS", "ATTEMPT", "ATTEMPT_ID", "LEASE_OWNER", "LEASE_UNTIL", "MANIFEST_SHA256", "PAGE",
    "REASONS", "REPORT_CACHE", "RUN_ID", "RUN_MODEL", "RUN_VERSION", "SHA256", "STATUS", "SUMMARY", "TAG",
    "VALIDATED_AT", "VERDICT", "Registry", "VersionState", "_prompt_check_once", "_quote", "configure_client",
    "default_owner", "iso", "iso_ms", "now_utc", "parse_iso", "translate",
]
