"""Files uploaded through the OpenAI Files API (jobs/use/openai_batches.py): kept within their owner's quota
(PORTAL_FILES_MAX_BYTES_PER_USER, PORTAL_FILES_MAX_PER_USER), deleted on request (files.delete) or once they expire
(PORTAL_FILES_RETENTION_DAYS, or sooner as their upload asked: the beat task jobs.expire_files runs sweep()), and never
while a batch that has not ended names them as its input. A fine-tune run keeps its own copy of its training data, so
the files it was started from may go at any time."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.files import File
from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone

from jobs.models import BatchFile, BatchRun

log = logging.getLogger(__name__)

# OpenAI's bounds for a file's expires_after (one hour to thirty days after its upload).
EXPIRES_AFTER_S = (3600, 30 * 24 * 3600)


class QuotaExceeded(ValueError):
    """The upload would take its owner past their quota; the message says which and what to do."""


class InUse(ValueError):
    """A batch that has not ended names the file as its input."""


@dataclass(frozen=True)
class Room:
    """What one user may still upload."""

    bytes: int
    files: int


def room(user_pk: int) -> Room:
    kept = BatchFile.objects.filter(owner_id=user_pk).aggregate(size=Sum("size_bytes"), files=Count("pk"))
    return Room(
        bytes=max(0, settings.PORTAL_FILES_MAX_BYTES_PER_USER - (kept["size"] or 0)),
        files=max(0, settings.PORTAL_FILES_MAX_PER_USER - kept["files"]),
    )


def no_room_for_files() -> str:
    return (
        f"you keep {settings.PORTAL_FILES_MAX_PER_USER} files, the most one user may (delete some with files.delete, "
        "or wait for them to expire)"
    )


def no_room_for_bytes(left: int) -> str:
    return (
        f"{left:,} bytes are left of your {settings.PORTAL_FILES_MAX_BYTES_PER_USER:,} for files (delete some with "
        "files.delete, or wait for them to expire)"
    )


def expiry(created_at: datetime, asked_s: int | None = None) -> datetime | None:
    """When a file uploaded at `created_at` expires: the site's retention, or the sooner time its upload asked for."""
    limits = [timedelta(seconds=asked_s)] if asked_s else []
    if settings.PORTAL_FILES_RETENTION_DAYS:
        limits.append(timedelta(days=settings.PORTAL_FILES_RETENTION_DAYS))
    return created_at + min(limits) if limits else None


def store(
    owner: User,
    content: File[bytes],
    filename: str,
    size: int,
    expires_after_s: int | None = None,
    purpose: str = "batch",
) -> BatchFile:
    """Keep a checked upload as its owner's file, if it fits their quota; QuotaExceeded otherwise.

    One user's uploads are kept one at a time (their user row is locked; SQLite's writers take turns anyway), so two
    at once cannot both fit in the room one of them had. A file on disk (a TemporaryUploadedFile) is moved into
    storage, not copied."""
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        left = room(owner.pk)
        if left.files < 1:
            raise QuotaExceeded(no_room_for_files())
        if size > left.bytes:
            raise QuotaExceeded(f"a file of {size:,} bytes does not fit: {no_room_for_bytes(left.bytes)}")
        stored = BatchFile(owner=owner, filename=filename[:200], size_bytes=size, purpose=purpose)
        stored.expires_at = expiry(timezone.now(), expires_after_s)
        stored.content.save("input.jsonl", content, save=False)
        try:
            stored.save()
        except BaseException:
            stored.content.delete(save=False)
            raise
    return stored


def delete(upload: BatchFile) -> None:
    """Delete a file and its content; InUse while a batch that has not ended names it as its input (a batch that
    ended keeps its record, with no input file)."""
    with transaction.atomic():
        live = list(
            BatchRun.objects.filter(input_file=upload, state__in=BatchRun.LIVE_STATES).values_list("pk", flat=True)
        )
        if live:
            batches = ", ".join(f"batch_{pk.hex}" for pk in live)
            raise InUse(f"{batches} still use{'s' if len(live) == 1 else ''} this file; cancel it or wait for its end")
        name = upload.content.name
        upload.delete()
        transaction.on_commit(lambda: upload.content.storage.delete(name))


def sweep(now: datetime | None = None) -> int:
    """Delete every file whose time has come, except those a batch that has not ended still uses (they go at a sweep
    after its end); the number deleted."""
    due = BatchFile.objects.filter(expires_at__lte=now or timezone.now()).exclude(runs__state__in=BatchRun.LIVE_STATES)
    deleted = 0
    for upload in due.only("pk", "content"):
        try:
            delete(upload)
        except InUse:  # a batch started on it since the query
            continue
        deleted += 1
    if deleted:
        log.info("deleted %d expired batch files", deleted)
    return deleted
