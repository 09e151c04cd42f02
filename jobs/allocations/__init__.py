"""Allocations: what each one counts in its current period (spend.py), the period and when it resets (periods.py),
launches and calls refused once one is spent (check.py, door.py), and the mails at its soft threshold (mail.py).

Below the sessions, the proxy, the usage pages and the metrics, which all ask it; it reads only jobs.models.
"""
