"""What runs where: sessions of model servers on Slurm, and using them.

    models/     the data: sessions and their events, partition state, API tokens, chat
    cluster/    the cluster side: Slurm's text, job scripts, the submit and poll shell, capacity, job logs, the way
                to a node's server. Knows Slurm and the shell, not a session's lifecycle.
    sessions/   sessions and their lifecycle: the launch form, actions, submit/poll/cancel, the wizard, emails,
                the researcher's session pages
    batch/      batch runs: the prompts check, what people do to runs, their progress, staging, their pages
    use/        using a running model: chat, the streaming proxy and API, tokens
    tasks.py    thin Celery tasks over sessions/lifecycle.py, batch/ and cluster/

Imports run one way: use -> batch -> sessions -> cluster -> models -> catalog -> portal. tasks.py calls sessions,
batch and cluster; sessions/actions.py and batch/actions.py (what people do) enqueue tasks; nothing below imports
them. docs/architecture.md has the whole map.
"""
