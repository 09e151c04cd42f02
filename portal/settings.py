"""The portal's only settings module. Everything site-specific comes from the environment.

Embedded defaults (SQLite, a filesystem Celery broker under var/) need no server; setting DATABASE_URL and
REDIS_URL switches to PostgreSQL and Redis with the same code path.
"""

from __future__ import annotations

import base64
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
import django_stubs_ext

from portal.env import ImproperlyConfiguredEnv, env_bool, env_int, env_list, env_secret, env_str

# Lets the admin's classes name their model (ModelAdmin[Cluster]) at run time, as the type checker sees them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("PORTAL_VAR_DIR", str(BASE_DIR / "var")))


def _private_dir(path: Path) -> Path:
    """A directory only the portal's user may enter: var/ holds the database, the secret key, queued messages and
    cached job logs."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


_private_dir(VAR_DIR)

DEBUG = env_bool("DJANGO_DEBUG", False)

_secret = env_secret("DJANGO_SECRET_KEY")
if _secret is None:
    # Without a configured key, keep a random one under var/ (0600) so a single-host install needs no setup and
    # its signed cookies survive restarts. Several web hosts must share DJANGO_SECRET_KEY instead.
    _key_file = VAR_DIR / "secret_key"
    if not _key_file.exists():
        import secrets

        _key_file.touch(mode=0o600)
        _key_file.write_text(secrets.token_urlsafe(50))
    _secret = _key_file.read_text().strip()
SECRET_KEY: str = _secret
# Earlier keys after a change of DJANGO_SECRET_KEY: sessions and signed values stay valid, and secrets stored under a
# key derived from them still decrypt (portal/crypto.py).
SECRET_KEY_FALLBACKS = env_list("DJANGO_SECRET_KEY_FALLBACKS", [])

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "portal",  # its management commands (reencrypt)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "catalog",
    "jobs",
    "axes",  # failed sign-ins, counted for the sign-in throttle below
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as axes asks: it only turns a sign-in its backend refused into the lockout page, on the way out.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_database_url = env_str("DATABASE_URL")
if _database_url:
    try:
        DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=True)}
    except ValueError as exc:
        raise ImproperlyConfiguredEnv(f"DATABASE_URL cannot be used: {exc}") from None
else:
    _sqlite = Path(env_str("PORTAL_SQLITE_PATH", str(VAR_DIR / "portal.sqlite3")))
    if not _sqlite.exists():  # SQLite would create it world-readable (0644); its journals copy these bits
        # A folder made here is private; one that exists is left as it is (it may be /tmp or a shared /srv).
        _sqlite.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(_sqlite, os.O_CREAT | os.O_WRONLY, 0o600))
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(_sqlite),
            # A file, not memory, so end-to-end tests can share the test database with a real Celery worker.
            "TEST": {"NAME": str(VAR_DIR / "test.sqlite3")},
            # SQLite serialises writers; a busy timeout lets the web process and a Celery worker share the file.
            # Write-ahead logging: readers never wait for a writer, and a commit appends to the log without an fsync
            # (synchronous=NORMAL; a power cut may lose the last commits, never the file). Without it each proxy
            # request's usage row cost an fsync, 2.5-4 ms, on the threads the next request's lookup runs on.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("PORTAL_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on every request while it is missing
# Uploaded files (batch runs' checked prompts), private: no URL serves them. Shared storage when the portal runs on
# several hosts (an NFS path here, or another storage backend in STORAGES["default"]).
MEDIA_ROOT = Path(env_str("PORTAL_FILES_DIR", str(VAR_DIR / "files")))
_private_dir(MEDIA_ROOT)
# Uploads on their way in (the Files API's bodies, prompts files being parsed): on disk in a private folder, not in
# /tmp, which may be shared with other users or be memory (tmpfs).
FILE_UPLOAD_TEMP_DIR = str(_private_dir(VAR_DIR / "uploads"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if env_bool("PORTAL_MANIFEST_STATIC", not DEBUG)
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "jobs:sessions"
LOGOUT_REDIRECT_URL = "login"
# Single sign-on: add "mozilla_django_oidc.auth.OIDCAuthenticationBackend" (OIDC) or
# "django_auth_ldap.backend.LDAPBackend" (LDAP) here, after axes's backend, and configure that package;
# docs/admin-guide.md shows how.
AUTHENTICATION_BACKENDS = [
    # First, so a locked-out sign-in is refused before any backend checks its password (with LDAP, before the
    # directory counts a failure of its own and perhaps locks the account out of the cluster too).
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# --- Sign-in throttling (django-axes, portal/lockout.py; docs/admin-guide.md) -------------------------------
# Failed sign-ins at /accounts/login/ and /admin/login/ are counted in the database. PORTAL_LOGIN_FAILURE_LIMIT of them
# lock out further sign-ins, the right password included, until PORTAL_LOGIN_COOLOFF_MINUTES after the last one; the
# failure that reaches the limit is already answered with the lockout page (429). Signed-in browsers and API tokens
# are not affected: they do not sign in.
PORTAL_LOGIN_FAILURE_LIMIT = env_int("PORTAL_LOGIN_FAILURE_LIMIT", 5, minimum=1)
PORTAL_LOGIN_COOLOFF_MINUTES = env_int("PORTAL_LOGIN_COOLOFF_MINUTES", 15, minimum=1)
AXES_FAILURE_LIMIT = PORTAL_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=PORTAL_LOGIN_COOLOFF_MINUTES)
# Two counters, either of which locks (docs/admin-guide.md weighs them): a user name's, from any address, so one
# account gets LIMIT guesses per cool-off however many addresses the guesser holds (IPv6 makes them cheap); and an
# address's, for any name, so one address can neither spray a password over every account nor lock out more than one
# account per cool-off. (Name, address) pairs alone would spare users lockouts others cause, but let guesses grow with
# the attacker's addresses. The address is the one the web server saw (portal/lockout.py's client_address).
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_CLIENT_IP_CALLABLE = "portal.lockout.client_address"
AXES_USERNAME_CALLABLE = "portal.lockout.username_key"
# A success clears the user's own failures (portal.lockout.AttemptsHandler: not, as axes's reset would, every failure
# from the same address, which would let anyone with an account reset their address's count at will).
AXES_HANDLER = "portal.lockout.AttemptsHandler"
AXES_RESET_ON_SUCCESS = True
# Attempts while locked out are refused unchecked and not counted, so the lockout ends at the time the page states
# rather than moving on each time the user tries again.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "portal.lockout.locked_out"
# No row per successful sign-in kept forever (who, from where, with which browser): the throttle does not need it.
AXES_DISABLE_ACCESS_LOG = True

# Fernet keys for secrets stored in the database (SSH private keys, session API keys); the first encrypts.
PORTAL_ENCRYPTION_KEYS = env_list("PORTAL_ENCRYPTION_KEYS", [])
for _key in PORTAL_ENCRYPTION_KEYS:
    try:
        if len(base64.urlsafe_b64decode(_key.encode())) != 32:
            raise ValueError
    except ValueError:
        raise ImproperlyConfiguredEnv(
            "PORTAL_ENCRYPTION_KEYS must be comma-separated Fernet keys (32 url-safe base64 bytes each); make one with "
            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        ) from None

# --- Metrics ----------------------------------------------------------------------------------------------
# Every web and worker process on this host writes its Prometheus counters here (prometheus_client's multiprocess
# mode, jobs/operations/metrics.py); the client reads PROMETHEUS_MULTIPROC_DIR when it is first imported, which is
# after the settings. `scripts/serve prepare` empties it before the processes start.
PORTAL_METRICS_DIR = Path(env_str("PROMETHEUS_MULTIPROC_DIR", env_str("PORTAL_METRICS_DIR", str(VAR_DIR / "metrics"))))
PORTAL_METRICS_DIR.mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(PORTAL_METRICS_DIR)

# --- Sessions ---------------------------------------------------------------------------------------------
# How often beat polls each (cluster, account) and how long a submit may stay claimed before another worker
# takes it over (a worker killed mid-submit leaves its session in "submitting").
PORTAL_POLL_INTERVAL_S = env_int("PORTAL_POLL_INTERVAL_S", 5, minimum=1)
# Accounts whose queued, starting and running sessions one watch_sessions task waits on at once (a thread and an SSH
# channel each); more wait their turn in the same interval.
PORTAL_WATCH_THREADS = env_int("PORTAL_WATCH_THREADS", 32, minimum=1)
PORTAL_SUBMIT_STALE_S = env_int("PORTAL_SUBMIT_STALE_S", 240, minimum=1)
# A job that squeue, sacct and scontrol all stop knowing is declared lost after this long.
PORTAL_JOB_LOST_AFTER_S = env_int("PORTAL_JOB_LOST_AFTER_S", 900, minimum=1)
# The wizard asks Slurm (sbatch --test-only, cached a minute) for a start estimate of each fitting option.
PORTAL_WIZARD_ASKS_SLURM = env_bool("PORTAL_WIZARD_ASKS_SLURM", True)
# New --test-only questions one user's wizard may send a minute (0: no limit); cached answers do not count.
PORTAL_WIZARD_SLURM_PER_MINUTE = env_int("PORTAL_WIZARD_SLURM_PER_MINUTE", 20, minimum=0)
PORTAL_QUEUE_REFRESH_S = env_int("PORTAL_QUEUE_REFRESH_S", 60, minimum=5)
# How often beat reads the members of groups mapped to the cluster's Unix/LDAP groups or Slurm accounts (0: never;
# `manage.py groups sync` still does it on demand).
PORTAL_GROUP_SYNC_S = env_int("PORTAL_GROUP_SYNC_S", 900, minimum=0)
# Re-discovery of each cluster's partitions and GPUs (catalog/discover.py), through the account an admin last
# discovered it with: differences are kept as the cluster's drift, nothing else changes. 0: never.
PORTAL_DISCOVER_EVERY_S = env_int("PORTAL_DISCOVER_EVERY_S", 0, minimum=0)
PORTAL_LOG_TAIL_BYTES = env_int("PORTAL_LOG_TAIL_BYTES", 65536, minimum=1024)
# What one user may hold on a cluster at a time, unless the cluster's own limits say otherwise; 0: no limit.
PORTAL_MAX_SESSIONS_PER_USER = env_int("PORTAL_MAX_SESSIONS_PER_USER", 0, minimum=0)
PORTAL_MAX_GPUS_PER_USER = env_int("PORTAL_MAX_GPUS_PER_USER", 0, minimum=0)
# How many requests one API token may make a minute (0: no limit); past it the API answers 429 with Retry-After. All of
# one user's tokens together are held to PORTAL_API_USER_REQUESTS_PER_MINUTE (by default the same: more tokens are not
# more requests). Counted across every web process (jobs/models/counts.py).
PORTAL_API_REQUESTS_PER_MINUTE = env_int("PORTAL_API_REQUESTS_PER_MINUTE", 600, minimum=0)
PORTAL_API_USER_REQUESTS_PER_MINUTE = env_int(
    "PORTAL_API_USER_REQUESTS_PER_MINUTE", PORTAL_API_REQUESTS_PER_MINUTE, minimum=0
)
# Fair share on shared servers (a session shared with others, a model service): requests one user may have in flight
# on one at once, through the browser and the API together (0: no cap); past it, 429 with Retry-After. A service may
# set its own. Counted, like the limits above, in Redis where REDIS_URL is set, else in the database.
PORTAL_MAX_INFLIGHT_PER_USER = env_int("PORTAL_MAX_INFLIGHT_PER_USER", 4, minimum=0)
# Model services (docs/services.md). Each portal process publishes the requests it has open per replica this often
# (milliseconds), for the others' routing and the keeper's scaling (0: never, as in the unit tests). A request to a
# service with no ready replica is held up to PORTAL_SERVICE_HOLD_S seconds when one is expected ready by then, else
# answered 503 with Retry-After; a service with no history of its own expects a replica ready PORTAL_SERVICE_READY_S
# after its launch.
PORTAL_SERVICE_LOAD_EVERY_MS = env_int("PORTAL_SERVICE_LOAD_EVERY_MS", 1000, minimum=0)
PORTAL_SERVICE_HOLD_S = env_int("PORTAL_SERVICE_HOLD_S", 20, minimum=0)
PORTAL_SERVICE_READY_S = env_int("PORTAL_SERVICE_READY_S", 300, minimum=1)
# Personal API tokens one user may hold at once (revoked ones do not count); the tokens page and `manage.py apitoken
# create` refuse more.
PORTAL_MAX_API_TOKENS_PER_USER = env_int("PORTAL_MAX_API_TOKENS_PER_USER", 20, minimum=1)
# The largest request body any page or form takes, signed in or not (portal/bodies.py: checked before Django reads
# it). Django's own in-memory bound for uploads, so a body within it never reaches the disk; a signed-in user's
# prompts file for a batch run may be larger (PORTAL_BATCH_MAX_BYTES).
PORTAL_MAX_FORM_BYTES = env_int("PORTAL_MAX_FORM_BYTES", 2_621_440, minimum=1024)
# The largest request body the proxy and the API take (a long chat history, a batch of texts to embed). Django's own
# limit for request bodies is the same, so the browser's route and the API agree.
PORTAL_MAX_REQUEST_BYTES = env_int("PORTAL_MAX_REQUEST_BYTES", 8 << 20, minimum=1024)
# Batch runs' prompts files (docs/batch.md): the largest file, line and number of prompts one run takes.
PORTAL_BATCH_MAX_BYTES = env_int("PORTAL_BATCH_MAX_BYTES", 100 << 20, minimum=1024)
PORTAL_BATCH_MAX_LINE_BYTES = env_int("PORTAL_BATCH_MAX_LINE_BYTES", 1 << 20, minimum=1024)
PORTAL_BATCH_MAX_PROMPTS = env_int("PORTAL_BATCH_MAX_PROMPTS", 100_000, minimum=1)
# A fine-tune run's training data (docs/finetune.md): the largest file and the most examples it may hold; its lines are
# bounded as a prompts file's are (PORTAL_BATCH_MAX_LINE_BYTES).
PORTAL_FINETUNE_MAX_BYTES = env_int("PORTAL_FINETUNE_MAX_BYTES", 100 << 20, minimum=1024)
PORTAL_FINETUNE_MAX_EXAMPLES = env_int("PORTAL_FINETUNE_MAX_EXAMPLES", 100_000, minimum=1)
# The largest adapter directory a run's page downloads (a full fine-tune's is the whole model).
PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES = env_int("PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES", 4 << 30, minimum=1024)
# Files uploaded through the OpenAI Files API (docs/batch.md): what one user may keep (bytes and files), and how long a
# file is kept (days; 0: until deleted) unless its upload asked for less (expires_after). Beat deletes expired files
# every PORTAL_FILES_SWEEP_S, except those a batch that has not ended still uses.
PORTAL_FILES_MAX_BYTES_PER_USER = env_int("PORTAL_FILES_MAX_BYTES_PER_USER", 1 << 30, minimum=1024)
PORTAL_FILES_MAX_PER_USER = env_int("PORTAL_FILES_MAX_PER_USER", 100, minimum=1)
PORTAL_FILES_RETENTION_DAYS = env_int("PORTAL_FILES_RETENTION_DAYS", 30, minimum=0)
PORTAL_FILES_SWEEP_S = env_int("PORTAL_FILES_SWEEP_S", 3600, minimum=60)
# Usage (docs/usage.md): beat summarises the proxy's request rows every PORTAL_USAGE_SUMMARY_S into the rollups the
# usage pages read, and deletes the raw rows older than PORTAL_USAGE_RAW_DAYS once they are summarised (at least two
# days: a request is recorded when its reply ends, and its day is summarised again then).
PORTAL_USAGE_SUMMARY_S = env_int("PORTAL_USAGE_SUMMARY_S", 600, minimum=60)
PORTAL_USAGE_RAW_DAYS = env_int("PORTAL_USAGE_RAW_DAYS", 90, minimum=2)
# Allocations (jobs/allocations/): how long each web process keeps what it found about token allocations before asking
# the database again (an allocation's overspend is at most what this lets through), and how often the beat mails
# those at their soft threshold or spent.
PORTAL_ALLOCATION_CHECK_S = env_int("PORTAL_ALLOCATION_CHECK_S", 5, minimum=0)
PORTAL_ALLOCATION_MAIL_S = env_int("PORTAL_ALLOCATION_MAIL_S", 300, minimum=10)
DATA_UPLOAD_MAX_MEMORY_SIZE = PORTAL_MAX_REQUEST_BYTES

# Email for session notifications; EMAIL_URL-style settings come from the environment.
PORTAL_BASE_URL = env_str("PORTAL_BASE_URL", "http://127.0.0.1:8000")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_secret("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "hpc-llm-portal@localhost")
EMAIL_TIMEOUT = 10

# Production behind a TLS-terminating proxy that sets X-Forwarded-Proto (docs/admin-guide.md): HTTPS only, HSTS,
# secure cookies. `manage.py check --deploy` is clean with PORTAL_HTTPS=1 and the guide's other settings.
PORTAL_HTTPS = env_bool("PORTAL_HTTPS", False)
SESSION_COOKIE_SECURE = env_bool("PORTAL_SECURE_COOKIES", PORTAL_HTTPS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
if PORTAL_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # load balancers probe over plain HTTP
    SECURE_HSTS_SECONDS = env_int("PORTAL_HSTS_SECONDS", 365 * 24 * 3600, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("PORTAL_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("PORTAL_HSTS_PRELOAD", True)
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# --- Celery -----------------------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND: str | None = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {"visibility_timeout": 3600}
else:
    # kombu's filesystem transport: a queue is a folder of message files, so a worker needs no broker server.
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        _private_dir(_broker_dir / _sub)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT = "portal.broker:Transport"  # kombu's, with atomic message writes
    CELERY_RESULT_BACKEND = None
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Broadcast (remote control) messages; kombu's default is ./control in the working directory.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.5,
    }
# Short-lived facts shared by the web processes and the workers (Slurm's --test-only estimates, job logs the worker
# fetched): in Redis when there is one, else in files under var/cache/ that every process on this host reads.
CACHES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    if REDIS_URL
    else {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(VAR_DIR / "cache"),
        "OPTIONS": {"MAX_ENTRIES": 5000},
    }
}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("PORTAL_TASK_SOFT_TIME_LIMIT_S", 120, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("PORTAL_TASK_TIME_LIMIT_S", 180, minimum=1)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "poll-clusters": {"task": "jobs.poll_clusters", "schedule": float(PORTAL_POLL_INTERVAL_S)},
    "poll-finetunes": {"task": "jobs.poll_finetunes", "schedule": float(PORTAL_POLL_INTERVAL_S)},
    "watch-sessions": {
        "task": "jobs.watch_sessions",
        "schedule": float(PORTAL_POLL_INTERVAL_S),
        "options": {"expires": float(PORTAL_POLL_INTERVAL_S)},  # a late one would only overlap the next
    },
    "refresh-partitions": {"task": "jobs.refresh_partitions", "schedule": float(PORTAL_QUEUE_REFRESH_S)},
    "expire-files": {"task": "jobs.expire_files", "schedule": float(PORTAL_FILES_SWEEP_S)},
    "summarise-usage": {"task": "jobs.summarise_usage", "schedule": float(PORTAL_USAGE_SUMMARY_S)},
    "mail-allocations": {"task": "jobs.mail_allocations", "schedule": float(PORTAL_ALLOCATION_MAIL_S)},
    # Sessions' measured figures (jobs/sessions/measuring.py): a ready session's within half a minute.
    "measure-sessions": {"task": "jobs.measure_sessions", "schedule": 30.0, "options": {"expires": 30.0}},
    "keep-services": {
        "task": "jobs.keep_services",
        "schedule": float(PORTAL_POLL_INTERVAL_S),
        "options": {"expires": float(PORTAL_POLL_INTERVAL_S)},
    },
}
if PORTAL_GROUP_SYNC_S:
    CELERY_BEAT_SCHEDULE["sync-groups"] = {"task": "jobs.sync_groups", "schedule": float(PORTAL_GROUP_SYNC_S)}
if PORTAL_DISCOVER_EVERY_S:
    CELERY_BEAT_SCHEDULE["rediscover"] = {"task": "jobs.rediscover", "schedule": float(PORTAL_DISCOVER_EVERY_S)}
CELERY_TIMEZONE = TIME_ZONE

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("PORTAL_LOG_LEVEL", "INFO")},
    # axes says something at INFO on every sign-in and command start; its failures and lockouts are warnings.
    "loggers": {"axes": {"level": "WARNING"}},
}
