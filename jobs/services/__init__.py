"""Model services (jobs/models/services.py): creating and stopping them, and keeping their replicas up.

Above the sessions (a replica is launched and cancelled through jobs.sessions.actions, like any session) and below the
proxy (jobs.use routes a request naming a service to one of its replicas: replicas.py here chooses which)."""
