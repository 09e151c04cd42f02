"""Sessions and cluster accounts arrive with the sessions issue; the app exists so migrations have a home."""

from __future__ import annotations
