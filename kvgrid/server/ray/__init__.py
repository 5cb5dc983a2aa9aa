"""kvgrid on a Ray cluster: `kvgrid serve --ray [ADDRESS]`, or ``start_on_ray`` in Python.

The frontend (OpenAI API, router, planner) and the engine workers are Ray actors; Ray places
them by their resources and node labels, and restarts them when they die. Requests, KV events
and snapshots travel as they do without Ray (HTTP and ZeroMQ between frontend and workers,
authenticated with the control keys of kvgrid.server.auth), so Ray adds nothing to the data path.

    secrets.py    what crosses from the driver to the actors (control keys, master key)
    placement.py  resources per worker, sites as groups of labelled nodes
    http.py       an actor's HTTP server, in a thread of its own
    actors.py     WorkerActor (one engine) and what every actor shares (serving, watchdog)
    fleet.py      RayFleet: workers as named actors; discovery, health and restarts from Ray
    frontend_actor.py  FrontendActor (API, router and planner; its workers are a RayFleet)
    serve.py      the driver: `kvgrid serve --ray` and ``start_on_ray``
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayServer", "start_on_ray"]


def __getattr__(name: str) -> Any:
    # Ray is imported only by what uses it: `kvgrid serve` without --ray never needs it.
    if name in __all__:
        from kvgrid.server.ray import serve

        return getattr(serve, name)
    raise AttributeError(name)
