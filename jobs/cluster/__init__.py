"""The cluster side: what the portal runs on a login host and reads back.

slurm.py (the portal's own jobs: their names, their squeue), jobscript.py with scripts/ (a session's sbatch script),
remote.py (the submit and poll shell commands and their output) are plain Python without Django; Slurm's text itself
is read with portal/slurm/, and values reach a shell only through portal/shellsafe.py's allow-lists. capacity.py
(partition state, --test-only, wait history, the recommended option), logs.py (job logs through the cache), login.py
(an account's connection test) and backend.py (the way to a node's server, direct or through SSH) use the models and
portal.ssh.

May import: jobs.models, catalog, portal. Never jobs.sessions, jobs.use or jobs.tasks.
"""
