"""Platform kits: each webhook platform's side of the wire as the tests play it (see ``base``).

``KITS`` holds one kit per platform, for tests written once and parametrised over all of them
(``tests/test_webhook_contract.py``); the platform modules hold each platform's constants and
body builders for its own end-to-end tests."""

from __future__ import annotations

from tests.kits.base import Ack, Inbound, Kit
from tests.kits.line import LINE
from tests.kits.messenger import MESSENGER
from tests.kits.slack import SLACK
from tests.kits.twilio import TWILIO

KITS: tuple[Kit, ...] = (MESSENGER, LINE, SLACK, TWILIO)

__all__ = ["KITS", "LINE", "MESSENGER", "SLACK", "TWILIO", "Ack", "Inbound", "Kit"]
