"""Fault tests: a seeded HTTP fault proxy on real sockets between the stage and the real S3 API server /
the real ``mlflow server``, and real process kills. Each test names the reliability row it covers."""

from tests.faults.proxy import FaultProxy, on

__all__ = ["FaultProxy", "on"]
