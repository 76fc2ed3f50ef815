"""The one place that imports Ray, and starts or joins a cluster."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["init", "require_ray"]

log = logging.getLogger("fastface.distributed")


def require_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the test extra installs Ray
        raise ImportError(
            "fastface.distributed needs Ray: pip install 'fastface[distributed]' "
            f"(importing ray failed: {e})"
        ) from e
    return ray


def init(address: str | None = None, **kwargs: Any) -> None:
    """Join the Ray cluster at ``address``, or start a local one when ``address`` is empty.

    Does nothing when this process is connected to Ray already (whatever the
    address). ``kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for a local
    cluster); a local cluster starts without the dashboard.
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("starting a local Ray cluster")
        kwargs.setdefault("include_dashboard", False)
        # "local": a new cluster of this process's own; ray.init() alone would join any
        # cluster another job on this machine happens to run
        ray.init(address="local", **kwargs)


def ray_failure_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a worker, actor or node failed (not the code it ran)."""
    ray = require_ray()
    exc = ray.exceptions
    return (
        exc.RayActorError,
        exc.WorkerCrashedError,
        exc.ObjectLostError,
        exc.NodeDiedError,
    )
