"""kombu's filesystem transport with atomic writes, for the embedded (server-less) broker.

kombu 5's filesystem Channel creates the message file under its final name and then writes it, while a worker's
reader moves and reads files without taking the writer's lock: a worker can read an empty file, fail to decode it
and stop. Here a message is written under a hidden temporary name and renamed into place (atomic on POSIX), so a
reader sees whole messages or none; a message that still cannot be decoded is set aside instead of killing the
worker. Declaring a queue (its binding in the exchange's table file) is atomic the same way: several processes that
declare the same queue for the first time at once would otherwise truncate and read each other's half-written table.
"""

from __future__ import annotations

import fcntl
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
from kombu.utils.json import dumps, loads

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

    def get_table(self, exchange: str) -> list[filesystem.exchange_queue_t]:  # type: ignore[override]
        """The exchange's bindings from its table file, plus those this process declared.

        kombu marks a binding as declared (process-wide) before it writes the table file, so another thread of the
        same process could publish in between, find no table and drop the message.
        """
        table = super().get_table(exchange)
        declared = (self.state.exchanges or {}).get(exchange, {}).get("table", [])
        for routing_key, pattern, queue in declared:
            binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
            if binding not in table:
                table.append(binding)
        return table

    def _queue_bind(self, exchange: str, routing_key: str | None, pattern: str | None, queue: str | None) -> None:
        # kombu 5.7's name check for exchange files (not in the type stubs yet)
        table = self._exchange_file(exchange)  # type: ignore[attr-defined]
        self.control_folder.mkdir(parents=True, exist_ok=True)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            with open(self.control_folder / f".{exchange}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time; readers see the old table or the new one
                bindings = [filesystem.exchange_queue_t(*b) for b in loads(table.read_text())] if table.exists() else []
                if binding in bindings:
                    return
                temporary = table.with_name(f".{table.name}.{uuid.uuid4()}.tmp")
                temporary.write_text(dumps([binding, *bindings]))
                os.replace(temporary, table)
        except OSError as exc:
            raise ChannelError(f"Cannot open {table}") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return super()._get(queue)
        except json.JSONDecodeError:
            log.error("a message of queue %s could not be decoded and was dropped", queue)
            raise Empty() from None


class Transport(filesystem.Transport):
    Channel = Channel
