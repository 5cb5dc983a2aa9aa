"""KV transfer between workers: a prefill worker streams a prompt's blocks to the decode worker.

``sender`` (prefill side) and ``receiver`` (decode side) move blocks as stored objects
(``kvgrid.store.object``) over an authenticated TCP channel (``auth``, ``wire``), from the
sender's G2 into the receiver's G2 through the store's own paths; ``model`` is the time
model the router, planner and simulator share; ``faults`` injects failures for drills.
"""
