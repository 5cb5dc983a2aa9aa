"""`kvgrid chaos`: a seeded fault-injection campaign against a live `kvgrid serve`, checking
every answer against a fault-free reference run (identical, or a clean error)."""
