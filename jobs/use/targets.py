"""The proxy's per-request lookup: whose token this is, and which session's server a request may reach.

It runs before every forwarded request, so it is two plain SQL statements on a kept connection rather than ORM
querysets: Django compiles a queryset on every call, which costs about a millisecond here (bench/proxy.py), while
the statements themselves take tens of microseconds. Table and column names come from the models' metadata and
every value is a bound parameter. The rules are the same as the pages': a session is reached by its owner, by
support staff (the explicit permission, sessions.access.sees_all) through its uuid, and by those it is shared with
(by name or through a group, in a grant in force for this route: the browser chat or the API) through its uuid or
`owner/alias`. A bare name is always the caller's own: an alias names their newest live session of that alias, and a
model named as the catalog does (NAME, or NAME:QUANT) their newest running session of it (a NAME that runs in several
quantisations is a question back, never a guess). So nothing an owner shares can stand in for a name of the
grantee's own, whichever of their sessions happens to be running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar

import httpx
from django import db
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection, models
from django.db.utils import InterfaceError, OperationalError
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.debug import sensitive_variables

from catalog.models import Cluster, ClusterAccount, ModelCard, ModelVariant, Runtime
from jobs.cluster import backend
from jobs.models import (
    END_STATES,
    OWNER_SEPARATOR,
    SEE_ALL_SESSIONS,
    SERVING_STATES,
    ApiToken,
    FineTuneRun,
    LLMSession,
    ModelService,
    SessionShare,
    served_model_name,
    token_digest,
)
from jobs.services import replicas as replicas_module
from portal import crypto

SHARE_ROUTES = ("chat", "api")  # the routes a grant names: SessionShare's columns of the same names
ACTIVITY_EVERY = timedelta(seconds=30)  # last activity feeds idle auto-cancel, which counts in minutes
TOKEN_USED_EVERY = timedelta(minutes=1)  # "last used" on the tokens page


@dataclass(frozen=True)
class Holder:
    user_pk: int
    sees_all: bool | None = None  # None: not asked yet (asked only when the session is someone else's)
    token_pk: int | None = field(default=None, compare=False)  # the API token it came with
    # A scoped token's limits (ApiToken): the model names it may use (empty: any) and its own rate (None: the site's).
    allowed_models: tuple[str, ...] = field(default=(), compare=False)
    requests_per_minute: int | None = field(default=None, compare=False)

    def may_name(self, model: str) -> bool:
        """Whether this caller's token may name `model` (as it spells it)."""
        return not self.allowed_models or model in self.allowed_models


@dataclass(frozen=True)
class Target:
    """What forwarding needs of a session."""

    pk: str
    state: str
    base: httpx.URL | None  # where the server answers (built from its parts); None unless running
    key: str = field(repr=False)  # the backend key; empty unless running
    served_model: str
    node_list: str
    runtime: str = ""  # the runtime's kind (catalog.runtime_rules): which API routes its server answers
    service: str = ""  # the model service it is a replica of, when the caller named the service
    activity_due: bool = field(default=False, compare=False)  # looked up with note=False: its use is to be noted
    # Used by others than its owner: a grant is in force, or the caller is not the owner (fair share: fairshare.py).
    shared: bool = field(default=False, compare=False)
    # llama-server with adapters: the request's `lora` field, [(adapter id, scale)], which the proxy always sends (a
    # slot keeps the adapters of its last request that named any): the one the caller named (ft:...) at 1, else the
    # base weights (every adapter at 0). None: a server without adapters, or vLLM (its module is the served_model).
    lora: tuple[tuple[int, float], ...] | None = None


# Lookups before each forwarded request run here; the threads live as long as the process, and so do their
# database connections.
_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="proxy-db")
T = TypeVar("T")


async def run(function: Callable[..., T], *args: Any) -> T:
    """Run a lookup on the proxy's own threads, whose database connections persist between requests.

    Django's per-request thread would open a new connection for every forwarded request, and the lookups need none
    of asgiref's context handling. A connection that went bad (the database restarted) is closed and the lookup tried
    once more; its only writes are idempotent timestamps.
    """

    return await asyncio.get_running_loop().run_in_executor(_threads, _attempt, function, *args)


def later(function: Callable[..., object], *args: Any) -> None:
    """Run `function` on the lookup threads without waiting for it: from where nothing may be awaited any more (the
    end of a stream, also one the client abandoned)."""
    _threads.submit(_attempt, function, *args)


def _attempt(function: Callable[..., T], *args: Any) -> T:
    try:
        return function(*args)
    except (OperationalError, InterfaceError):
        db.connection.close()
        return function(*args)


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _col(model: type[models.Model], field: str) -> str:
    column = model._meta.get_field(field)
    assert isinstance(column, models.Field)
    return _q(column.column)


@cache
def _sql(vendor: str) -> dict[str, str]:
    user = get_user_model()
    token, session = ApiToken._meta.db_table, LLMSession._meta.db_table

    def s(field: str) -> str:  # a session column, as the statements alias the table
        return f"s.{_col(LLMSession, field)}"

    holder = (
        f"SELECT t.{_col(ApiToken, 'id')}, t.{_col(ApiToken, 'user')}, {_sees_all_sql(user)}, "
        f"t.{_col(ApiToken, 'last_used_at')}, t.{_col(ApiToken, 'allowed_models')}, "
        f"t.{_col(ApiToken, 'requests_per_minute')} FROM {_q(token)} t JOIN {_q(user._meta.db_table)} u "
        f"ON u.{_col(user, 'id')} = t.{_col(ApiToken, 'user')} "
        f"WHERE t.{_col(ApiToken, 'digest')} = %s AND t.{_col(ApiToken, 'revoked_at')} IS NULL "
        f"AND (t.{_col(ApiToken, 'expires_at')} IS NULL OR t.{_col(ApiToken, 'expires_at')} > %s) "
        f"AND u.{_col(user, 'is_active')} = %s"
    )
    columns = (
        f"{s('id')}, {s('owner')}, {s('state')}, {s('host')}, {s('port')}, {s('api_key_encrypted')}, "
        f"{s('node_list')}, {s('last_activity_at')}, c.{_col(Cluster, 'node_access')}, "
        f"m.{_col(ModelCard, 'name')}, v.{_col(ModelVariant, 'quantization')}, c.{_col(Cluster, 'node_networks')}, "
        f"c.{_col(Cluster, 'login_host')}, c.{_col(Cluster, 'ssh_port')}, c.{_col(Cluster, 'host_key')}, "
        f"a.{_col(ClusterAccount, 'username')}, a.{_col(ClusterAccount, 'private_key_encrypted')}, "
        f"r.{_col(Runtime, 'kind')}, {_grants_sql(s('id'))}, {_adapters_sql(s('id'))}"
    )
    joins = (
        f"FROM {_q(session)} s "
        f"JOIN {_q(Cluster._meta.db_table)} c ON c.{_col(Cluster, 'id')} = {s('cluster')} "
        f"JOIN {_q(ClusterAccount._meta.db_table)} a ON a.{_col(ClusterAccount, 'id')} = {s('account')} "
        f"JOIN {_q(ModelVariant._meta.db_table)} v ON v.{_col(ModelVariant, 'id')} = {s('variant')} "
        f"JOIN {_q(ModelCard._meta.db_table)} m ON m.{_col(ModelCard, 'id')} = v.{_col(ModelVariant, 'model')} "
        f"JOIN {_q(Runtime._meta.db_table)} r ON r.{_col(Runtime, 'id')} = {s('runtime')} "
    )
    target = f"SELECT {columns} {joins}"
    end_states = ", ".join(["%s"] * len(END_STATES))
    serving = ", ".join(["%s"] * len(SERVING_STATES))
    # The owner's sessions that serve a model of this catalog name (NAME_PARAMS), newest first.
    named = (
        f"WHERE {s('owner')} = %s AND m.{_col(ModelCard, 'name')} = %s AND {s('state')} IN ({serving}) "
        f"AND {s('host')} <> %s"
    )
    # A grant in force that reaches user %s (by name, or through a group) on the session `{session}`; then the route's
    # column must be true. Parameters: SHARED_PARAMS.
    user_groups = _through(user, "groups")
    shared = (
        f"SELECT 1 FROM {_q(SessionShare._meta.db_table)} g WHERE g.{_col(SessionShare, 'session')} = {{session}} "
        f"AND g.{_col(SessionShare, 'revoked_at')} IS NULL "
        f"AND (g.{_col(SessionShare, 'expires_at')} IS NULL OR g.{_col(SessionShare, 'expires_at')} > %s) "
        f"AND (g.{_col(SessionShare, 'user')} = %s OR g.{_col(SessionShare, 'group')} IN ("
        f"SELECT ug.{_col(user_groups, 'group')} FROM {_q(user_groups._meta.db_table)} ug "
        f"WHERE ug.{_col(user_groups, 'user')} = %s)) AND g.{{route}} = %s"
    )
    by_route = {route: _col(SessionShare, route) for route in SHARE_ROUTES}
    return {
        "holder": holder,
        "sees_all": f"SELECT {_sees_all_sql(user)} FROM {_q(user._meta.db_table)} u "
        f"WHERE u.{_col(user, 'id')} = %s AND u.{_col(user, 'is_active')} = %s",
        "by_pk": target + f"WHERE {s('id')} = %s",
        "by_alias": target + f"WHERE {s('owner')} = %s AND {s('alias')} = %s "
        f"AND {s('state')} NOT IN ({end_states}) ORDER BY {s('created_at')} DESC LIMIT 1",
        **{f"shared_{route}": shared.format(session="%s", route=column) for route, column in by_route.items()},
        # owner/alias: that owner's newest live session of the alias (whether the caller may use it is checked after).
        "by_owner_alias": target + f"JOIN {_q(user._meta.db_table)} o ON o.{_col(user, 'id')} = {s('owner')} "
        f"WHERE o.{_col(user, user.USERNAME_FIELD)} = %s AND {s('alias')} = %s AND {s('state')} NOT IN ({end_states}) "
        f"ORDER BY {s('created_at')} DESC LIMIT 1",
        "by_name": target + named + f" ORDER BY {s('created_at')} DESC LIMIT 1",
        # A running service of this name, and whether user %s (active) may use it (ModelService.may_use's rule).
        "service": _service_sql(user),
        # A service's replicas that serve now (SERVING_STATES, an address), with when each began draining.
        "by_service": f"SELECT {columns}, {s('draining_since')} {joins}"
        f"WHERE {s('service')} = %s AND {s('state')} IN ({serving}) AND {s('host')} <> %s",
        "by_name_quant": target + named + f" AND v.{_col(ModelVariant, 'quantization')} = %s "
        f"ORDER BY {s('created_at')} DESC LIMIT 1",
        "quants_named": f"SELECT DISTINCT v.{_col(ModelVariant, 'quantization')} FROM {_q(session)} s "
        f"JOIN {_q(ModelVariant._meta.db_table)} v ON v.{_col(ModelVariant, 'id')} = {s('variant')} "
        f"JOIN {_q(ModelCard._meta.db_table)} m ON m.{_col(ModelCard, 'id')} = v.{_col(ModelVariant, 'model')} "
        + named,
        "touch_token": f"UPDATE {_q(token)} SET {_col(ApiToken, 'last_used_at')} = %s "
        f"WHERE {_col(ApiToken, 'id')} = %s",
        "touch_session": f"UPDATE {_q(session)} SET {_col(LLMSession, 'last_activity_at')} = %s "
        f"WHERE {_col(LLMSession, 'id')} = %s",
    }


def _grants_sql(session: str) -> str:
    """Two columns: whether a grant that never expires is in force on `session`, and the latest expiry of the others
    not revoked (compared with the time in Python, so that the statements take no parameter before their own)."""
    share, expires = _q(SessionShare._meta.db_table), _col(SessionShare, "expires_at")
    grants = (
        f"FROM {share} gs WHERE gs.{_col(SessionShare, 'session')} = {session} "
        f"AND gs.{_col(SessionShare, 'revoked_at')} IS NULL"
    )
    return f"EXISTS (SELECT 1 {grants} AND gs.{expires} IS NULL), (SELECT MAX(gs.{expires}) {grants})"


def _adapters_sql(session: str) -> str:
    """Whether the session loaded fine-tune runs' adapters (LLMSession.adapters)."""
    through = _through(LLMSession, "adapters")
    return f"EXISTS (SELECT 1 FROM {_q(through._meta.db_table)} la WHERE la.{_col(through, 'llmsession')} = {session})"


def _service_sql(user: type[models.Model]) -> str:
    """Parameters: SERVICE_PARAMS."""
    groups, user_groups = _through(ModelService, "groups"), _through(user, "groups")
    member = (
        f"SELECT 1 FROM {_q(groups._meta.db_table)} sg JOIN {_q(user_groups._meta.db_table)} ug "
        f"ON ug.{_col(user_groups, 'group')} = sg.{_col(groups, 'group')} "
        f"WHERE sg.{_col(groups, 'modelservice')} = sv.{_col(ModelService, 'id')} "
        f"AND ug.{_col(user_groups, 'user')} = %s"
    )
    return (
        f"SELECT sv.{_col(ModelService, 'id')}, (sv.{_col(ModelService, 'owner')} = %s "
        f"OR sv.{_col(ModelService, 'audience')} = %s "
        f"OR (sv.{_col(ModelService, 'audience')} = %s AND EXISTS ({member}))) "
        f"AND EXISTS (SELECT 1 FROM {_q(user._meta.db_table)} u WHERE u.{_col(user, 'id')} = %s "
        f"AND u.{_col(user, 'is_active')} = %s), sv.{_col(ModelService, 'max_inflight_per_user')} "
        f"FROM {_q(ModelService._meta.db_table)} sv WHERE sv.{_col(ModelService, 'name')} = %s "
        f"AND sv.{_col(ModelService, 'stopped_at')} IS NULL"
    )


def _service_params(user_pk: int, name: str) -> list[Any]:
    site, groups = ModelService.Audience.SITE, ModelService.Audience.GROUPS
    return [user_pk, site, groups, user_pk, user_pk, True, name]


def _sees_all_sql(user: type[models.Model]) -> str:
    """Whether user `u` holds the support permission, as has_perm() decides it: a superuser, or the permission given
    to the user or to one of their groups. Its parameters: SEE_ALL_PARAMS."""
    user_perms, user_groups = _through(user, "user_permissions"), _through(user, "groups")
    group_perms = _through(Group, "permissions")
    permission, content_type = _col(Permission, "content_type"), _col(ContentType, "id")
    named = (
        f"JOIN {_q(Permission._meta.db_table)} p ON p.{_col(Permission, 'id')} = {{link}} "
        f"JOIN {_q(ContentType._meta.db_table)} ct ON ct.{content_type} = p.{permission} "
        f"WHERE p.{_col(Permission, 'codename')} = %s AND ct.{_col(ContentType, 'app_label')} = %s"
    )
    direct = (
        f"SELECT 1 FROM {_q(user_perms._meta.db_table)} up "
        + named.format(link=f"up.{_col(user_perms, 'permission')}")
        + f" AND up.{_col(user_perms, 'user')} = u.{_col(user, 'id')}"
    )
    grouped = (
        f"SELECT 1 FROM {_q(user_groups._meta.db_table)} ug JOIN {_q(group_perms._meta.db_table)} gp "
        f"ON gp.{_col(group_perms, 'group')} = ug.{_col(user_groups, 'group')} "
        + named.format(link=f"gp.{_col(group_perms, 'permission')}")
        + f" AND ug.{_col(user_groups, 'user')} = u.{_col(user, 'id')}"
    )
    return f"(u.{_col(user, 'is_superuser')} = %s OR EXISTS ({direct}) OR EXISTS ({grouped}))"


def _through(model: type[models.Model], name: str) -> type[models.Model]:
    """The table behind a many-to-many field."""
    field = model._meta.get_field(name)
    assert isinstance(field, models.ManyToManyField)
    through = field.remote_field.through
    assert through is not None and not isinstance(through, str)
    return through


# The parameters of _sees_all_sql, in order.
SEE_ALL_PARAMS = [True, SEE_ALL_SESSIONS[1], SEE_ALL_SESSIONS[0], SEE_ALL_SESSIONS[1], SEE_ALL_SESSIONS[0]]


def _fetch_one(statement: str, params: list[Any]) -> tuple[Any, ...] | None:
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)[statement], params)
        row: tuple[Any, ...] | None = cursor.fetchone()
        return row


def _execute(statement: str, params: list[Any]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)[statement], params)


def _aware(value: Any) -> datetime | None:
    """A datetime column as Django would return it (SQLite hands back text in UTC)."""
    moment = parse_datetime(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime):
        return None
    return moment.replace(tzinfo=UTC) if timezone.is_naive(moment) else moment


def _db_datetime(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


@sensitive_variables("token")
def holder(token: str) -> Holder | None:
    """The active user a personal API token belongs to, with the token's scope, unless it is revoked or expired; notes
    its use once a minute."""
    if not token.startswith(ApiToken.PREFIX):
        return None
    now = timezone.now()
    row = _fetch_one("holder", [*SEE_ALL_PARAMS, token_digest(token), _db_datetime(now), True])
    if row is None:
        return None
    token_pk, user_pk, sees_all, last_used, allowed, rate = row
    last_used = _aware(last_used)
    if last_used is None or now - last_used > TOKEN_USED_EVERY:
        _execute("touch_token", [_db_datetime(now), token_pk])
    return Holder(int(user_pk), bool(sees_all), int(token_pk), _names(allowed), int(rate) if rate else None)


def _names(stored: Any) -> tuple[str, ...]:
    """A scoped token's model names as the column holds them (JSON text on SQLite; a list from PostgreSQL's jsonb)."""
    names = json.loads(stored) if isinstance(stored, str | bytes) else stored
    return tuple(str(name) for name in names) if isinstance(names, list) else ()


def touch(session_pk: str) -> None:
    """The session was used just now (idle auto-cancel counts from its last use)."""
    _execute(
        "touch_session",
        [_db_datetime(timezone.now()), LLMSession._meta.pk.get_db_prep_value(uuid.UUID(session_pk), connection)],
    )


def sees_all(user_pk: int) -> bool:
    """The support permission of an active user (the pages' rule, sessions.access.sees_all, in one statement)."""
    row = _fetch_one("sees_all", [*SEE_ALL_PARAMS, user_pk, True])
    return bool(row and row[0])


_opened_keys: dict[str, str] = {}  # a session's sealed API key: the key
OPENED_KEYS = 10_000  # past this many the memory starts over


def _opened(sealed: str) -> str:
    """A session's key, decrypted once per process: the same sealed text always opens to the same key, and opening it
    is 50 µs or more of every request's lookup here."""
    key = _opened_keys.get(sealed)
    if key is None:
        if len(_opened_keys) >= OPENED_KEYS:
            _opened_keys.clear()
        key = _opened_keys[sealed] = crypto.decrypt(sealed)
    return key


class Ambiguous(Exception):
    """A model name that runs in several of the caller's sessions with different quantisations."""


def _name_params(user_pk: int, name: str) -> list[Any]:
    return [user_pk, name, *sorted(SERVING_STATES), ""]


def _by_name(user: Holder, key: str) -> tuple[Any, ...] | None:
    """The owner's newest running session of the catalog model `key` names (NAME or NAME:QUANT)."""
    name, colon, quant = key.rpartition(":")
    if colon and name and quant:
        row = _fetch_one("by_name_quant", [*_name_params(user.user_pk, name), quant])
        if row is not None:
            return row  # else a catalog name may itself hold a colon
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)["quants_named"], _name_params(user.user_pk, key))
        quants = sorted(str(q) for (q,) in cursor.fetchall())
    if len(quants) > 1:
        choices = " or ".join(f"{key}:{q}" for q in quants)
        raise Ambiguous(f"{key} runs in your sessions as {', '.join(quants)}: name one as {choices}, or a session by "
                        "its alias or uuid")  # fmt: skip
    return _fetch_one("by_name", _name_params(user.user_pk, key)) if quants else None


def _shared_params(user_pk: int, route: str) -> list[Any]:
    assert route in SHARE_ROUTES
    return [_db_datetime(timezone.now()), user_pk, user_pk, True]


def _shared(session_pk: Any, user_pk: int, route: str) -> bool:
    """Whether a grant in force shares the session with the user for this route."""
    return _fetch_one(f"shared_{route}", [session_pk, *_shared_params(user_pk, route)]) is not None


@dataclass(frozen=True)
class Replicas:
    """A service the caller may use and its ready replicas, looked up in one go; which replica takes the request is
    chosen in memory once the request's affinity key is known (pick)."""

    service: str
    service_pk: int
    ready: dict[str, Target]  # taking requests
    draining: dict[str, Target]  # ready but draining: used only when no other is ready
    max_inflight_per_user: int | None = None  # the service's own fair-share cap; None: the site's


class NotReady(Exception):
    """A service the caller may use that has no ready replica now."""

    def __init__(self, service: str, service_pk: int) -> None:
        super().__init__(service)
        self.service, self.service_pk = service, service_pk


def by_service(user: Holder, name: str, route: str) -> Replicas | None:
    """The running service `name` and its ready replicas, if the user may use it; None when there is no such service
    or they may not (the same 404 as a name that does not exist). Raises NotReady when none of its replicas is."""
    found = _fetch_one("service", _service_params(user.user_pk, name))
    if found is None or not found[1]:
        return None
    service_pk = int(found[0])
    ready: dict[str, Target] = {}
    draining: dict[str, Target] = {}
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)["by_service"], [service_pk, *sorted(SERVING_STATES), ""])
        rows = cursor.fetchall()
    for row in rows:
        replica = _target_of(user, row[:-1], route, note=False, by_uuid=False, service=name)
        if replica is not None and replica.base is not None:
            (ready if row[-1] is None else draining)[replica.pk] = replica
    if not ready and not draining:
        raise NotReady(name, service_pk)
    return Replicas(name, service_pk, ready, draining, None if found[2] is None else int(found[2]))


def pick(replicas: Replicas, key: str = "", exclude: Collection[str] = ()) -> tuple[Target | None, str]:
    """The replica of `replicas` that takes a request with this affinity key (replicas.choose), leaving out `exclude`
    (one that just failed), and how it was chosen; draining replicas only when no other is ready. In memory: the
    lookup that made `replicas` ran before."""
    for pool in (replicas.ready, replicas.draining):
        chosen, decision = replicas_module.choose([pk for pk in pool if pk not in exclude], key)
        if chosen is not None:
            return pool[chosen], decision
    return None, ""


def _by_owner_alias(key: str) -> tuple[Any, ...] | None:
    """The session `owner/alias` names: that owner's newest live session of the alias, whoever asks."""
    owner, separator, alias = key.partition(OWNER_SEPARATOR)
    if not (separator and owner and alias):
        return None
    return _fetch_one("by_owner_alias", [owner, alias, *sorted(END_STATES)])


@sensitive_variables("secret")
def target(user: Holder, key: str, route: str = "api", note: bool = True) -> Target | None:
    """targets.find for a session: a service's name gives its least loaded ready replica (no affinity)."""
    found = find(user, key, route, note)
    if isinstance(found, Replicas):
        chosen, _ = pick(found)
        if chosen is not None and chosen.activity_due and note:
            touch(chosen.pk)
        return chosen
    return found


@sensitive_variables("secret")
def find(user: Holder, key: str, route: str = "api", note: bool = True) -> Target | Replicas | None:
    """The session `key` names for this user on this route ("api" or the browser's "chat"): its uuid, the alias of
    one of their own sessions, the catalog name of a model one of their own runs, or `owner/alias` (their own, or one
    shared with them for this route); None when there is none they may use. Support staff reach others' sessions by
    uuid only. Raises Ambiguous for a name that runs in several quantisations.

    The session's last activity is noted when it is due, unless `note` is false (a lookup ahead of knowing whether the
    request will use it): then the Target says so (activity_due), and the caller notes it (touch) if it uses it."""
    if key.startswith(ADAPTER_PREFIX):
        return by_adapter(user, key, route, note)
    row, by_uuid = None, False
    try:
        pk = uuid.UUID(key)
    except ValueError:
        pass
    else:
        row = _fetch_one("by_pk", [LLMSession._meta.pk.get_db_prep_value(pk, connection)])
        by_uuid = row is not None
    if row is None:
        row = _fetch_one("by_alias", [user.user_pk, key, *sorted(END_STATES)])
    if row is None:
        row = _by_name(user, key)
    if row is None and OWNER_SEPARATOR not in key:
        service = by_service(user, key, route)
        if service is not None:
            return service
    if row is None:
        row = _by_owner_alias(key)
    return _target_of(user, row, route, note=note, by_uuid=by_uuid, service="")


BASE_WEIGHTS = ((0, 0.0),)  # llama-server's `lora`: adapters it does not list are at scale 0
ADAPTER_PREFIX = "ft:"  # a fine-tune run's model name (FineTuneRun.model_name), as OpenAI names fine-tuned models


def by_adapter(user: Holder, name: str, route: str = "api", note: bool = True) -> Target | None:
    """The session a fine-tune run's model name reaches: the caller's newest running session that loaded the run's
    adapter, else the newest one shared with them (for this route); None when there is none they may use. The Target
    names the adapter as its server knows it: vLLM's LoRA module (the run's uuid), llama-server's adapter id.

    Rarer than the other names, so ORM queries here, then the same access rule as every session (_target_of)."""
    parts = name.split(":")
    if len(parts) != 5:
        return None
    _, base, owner, suffix, _short = parts
    runs = FineTuneRun.objects.filter(owner__username=owner, suffix=suffix, variant__model__name=base)
    run = next((r for r in runs.select_related("owner", "variant__model") if r.model_name == name), None)
    if run is None:
        return None
    loaded = LLMSession.objects.filter(adapters=run, state__in=SERVING_STATES).exclude(host="")
    candidates = sorted(loaded.values_list("pk", "owner_id", "created_at"),
                        key=lambda c: (c[1] != user.user_pk, -c[2].timestamp()))  # fmt: skip
    for pk, _owner, _created in candidates:
        row = _fetch_one("by_pk", [LLMSession._meta.pk.get_db_prep_value(pk, connection)])
        found = _target_of(user, row, route, note=note, by_uuid=False, service="")
        if found is None:
            continue
        if found.runtime == "vllm":
            return dataclasses.replace(found, served_model=str(run.pk))
        ids = list(FineTuneRun.objects.filter(sessions=pk).order_by("pk").values_list("pk", flat=True))
        return dataclasses.replace(found, lora=((ids.index(run.pk), 1.0),))
    return None


@sensitive_variables("secret")
def _target_of(
    user: Holder, row: tuple[Any, ...] | None, route: str, *, note: bool, by_uuid: bool, service: str
) -> Target | None:
    if row is None:
        return None
    pk_value, owner_pk, state, host, port, key_encrypted, node_list, last_activity, access, model, quantization = row[
        :11
    ]
    networks, runtime, never_expiring, latest_expiry, adapters = row[11], row[17], row[18], row[19], row[20]
    if int(owner_pk) != user.user_pk and not service:  # a service's replicas: by_service checked who may use it
        support = by_uuid and (user.sees_all if user.sees_all is not None else sees_all(user.user_pk))
        if not support and not _shared(pk_value, user.user_pk, route):
            return None
    base: httpx.URL | None = None
    secret = ""
    due = False
    if state in SERVING_STATES and host and port:
        if access == Cluster.NodeAccess.TUNNEL:
            ssh_target = ClusterAccount.target_of(*row[12:17])
            base = backend.forwarded_url(ssh_target, host, port, str(uuid.UUID(str(pk_value))), networks)
        else:
            base = backend.server_url(host, port, networks)
        secret = _opened(key_encrypted)
        now = timezone.now()
        last_activity = _aware(last_activity)
        due = last_activity is None or now - last_activity > ACTIVITY_EVERY
        if due and note:
            _execute("touch_session", [_db_datetime(now), pk_value])
    latest_expiry = _aware(latest_expiry)
    shared = (
        int(owner_pk) != user.user_pk
        or bool(never_expiring)
        or (latest_expiry is not None and latest_expiry > timezone.now())
    )
    return Target(str(uuid.UUID(str(pk_value))), state, base, secret, served_model_name(model, quantization), node_list,
                  runtime, service, activity_due=due and not note, shared=shared,
                  lora=BASE_WEIGHTS if adapters and runtime == "llama.cpp" else None)  # fmt: skip
