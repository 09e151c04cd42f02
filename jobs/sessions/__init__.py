"""Sessions and their lifecycle.

forms.py is the one definition of a launch; actions.py is what people do (launch, cancel, ask for a log) and the
only place that enqueues tasks; lifecycle.py is the worker's part (submit, poll, cancel) as plain functions;
wizard.py builds the launch page's state; notify.py sends the emails; access.py is the ownership rule;
views.py has the session pages and the cluster accounts page.

May import: jobs.cluster, jobs.models, jobs.tasks (actions.py only), catalog, portal. Never jobs.use.
"""
