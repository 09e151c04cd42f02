"""Batch runs: a prompts file in, a dataset out (docs/batch.md). inputs.py checks and normalises a prompts file
(plain Python, no Django); the runner that sends the requests runs in the job on the compute node
(jobs/cluster/scripts/batchrun.py, Python standard library only).

May import: jobs.cluster, jobs.models, catalog, portal. jobs.sessions uses it (the launch form checks a prompts
file, the poll records progress), never the reverse.
"""
