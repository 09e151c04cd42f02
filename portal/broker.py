"""kombu's filesystem transport with atomic writes, for the embedded (server-less) broker.

kombu 5's filesystem Channel creates the message file under its final name and then writes it, while a worker's
reader moves and reads files without taking the writer's lock: a worker can read an empty file, fail to decode it
and stop. Here a message is written under a hidden temporary name and renamed into place (atomic on POSIX), so a
reader sees whole messages or none; a message that still cannot be decoded is set aside instead of killing the
worker.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # The leading dot keeps the reader's "<id>.<queue>.msg" match off the file until it is complete.
        temporary = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(temporary, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(temporary, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return super()._get(queue)
        except json.JSONDecodeError:
            log.error("a message of queue %s could not be decoded and was dropped", queue)
            raise Empty() from None


class Transport(filesystem.Transport):
    Channel = Channel
