"""A Ray Serve application that runs one kvgrid deployment: what KubeRay's RayService runs.

A RayService deploys Serve applications and health-checks them. This application has one
replica, the deployment's driver: it starts kvgrid's frontend actor (which starts the
workers) exactly as `kvgrid serve --ray` does, owns it, and reports whether its API answers.
Requests do not pass through Ray Serve: clients reach kvgrid's own port on the replica's node
(pin the replica to the head pod with a custom resource; a Service exposes the port).

    serveConfigV2: |
      applications:
        - name: kvgrid
          import_path: kvgrid.server.ray.rayservice:app
          args: {model: /models/llama, max_workers: 8, port: 8080}

``args`` are `kvgrid serve`'s flags by their Python names (kvgrid.server.ray.start_on_ray).
Needs Ray Serve (``pip install 'ray[serve]'``; KubeRay's Ray images have it).
"""

from __future__ import annotations

from typing import Any

import httpx
from ray import serve


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=8,
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 0},
)
class KvgridDriver:
    def __init__(self, options: dict[str, Any]) -> None:
        from kvgrid.server.ray.serve import start_on_ray

        self.server = start_on_ray(None, **options)

    def check_health(self) -> None:
        """Healthy while the frontend's API answers: a 503 (no worker up yet, or all of them
        restarting) is Ray's and the planner's to fix, not a reason to restart the cluster."""
        try:
            r = httpx.get(f"{self.server.url}/health", timeout=10)
        except httpx.HTTPError as e:
            raise RuntimeError(f"kvgrid's API at {self.server.url} does not answer: {e!r}") from e
        if r.status_code not in (200, 503):
            raise RuntimeError(f"kvgrid's /health answered {r.status_code}")

    async def __call__(self, request) -> dict[str, Any]:
        r = httpx.get(f"{self.server.url}/health", timeout=10)
        return {"kvgrid": self.server.url, "health": r.json()}

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def app(args: dict[str, Any]) -> serve.Application:
    return KvgridDriver.bind(dict(args))
