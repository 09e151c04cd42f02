"""Using a running model: the chat's rules (chat.py) and pages (views.py), the streaming proxy for the browser and
the scripts' API (proxy.py, with targets.py for its per-request lookup and relay.py for the stream), and the API
tokens page.

May import: jobs.sessions (access), jobs.cluster, jobs.models, catalog, portal.
"""
