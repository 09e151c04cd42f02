"""Fine-tune runs: a dataset in, a LoRA adapter out (docs/finetune.md). data.py checks a training file (plain Python,
with jobs/batch/inputs.py's line reader); the trainer runs in the job on the compute node
(jobs/cluster/scripts/finetune.py, on the cluster's PyTorch environment with PEFT and TRL).

May import: jobs.batch (the line reader), jobs.sessions (the launch form's fields and checks), jobs.cluster,
jobs.models, catalog, portal. Nothing below it imports it.
"""
