"""Router: the global KV index, routing policies and the pure Router the server and the
simulator share (no I/O here; the server's I/O lives in kvgrid.server.links).

    router.py      Router: worker registry, feeds from workers, route() in named steps
                   (eligible workers, candidates, choice, prefill plan, bookkeeping)
    candidates.py  a worker as a candidate for one request; its predicted time to first token
    policies.py    the policies that pick among scored candidates
    disagg.py      where a request's prompt is prefilled: where it decodes, or on another worker
    decision.py    a Decision: the choice and every candidate's numbers behind it
    index.py       KVIndex: which worker holds which block, in which tier
    keychains.py   which workers share block keys for a tenant, and a request's keys
    recent.py      where the router just sent which prefixes (before their KV events arrive)
    workers.py     what the router knows about each worker; the fleet's median speeds
    wire.py        the wire codec of KV event batches, snapshots and load reports
    sites.py       groups of workers with a shared round trip and price
"""
