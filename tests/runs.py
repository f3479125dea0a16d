"""How the tests of what surrounds labeling (commits, leases, tables, nights) label: small batches, the
local engine. The Ray engine is tested end to end where Ray is the subject (test_job, test_engines,
test_multinode, test_ray_compat, test_hostile_rows, test_reliability, ...), and both engines share
every stage, so these need not pay Ray Data's per-run overhead."""

TUNING = dict(batch_size=16, engine="local", progress=False)
