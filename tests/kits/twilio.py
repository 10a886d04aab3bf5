"""Twilio SMS: form webhooks signed with the SDK's own ``RequestValidator`` over the URL the
gateway rebuilds, the Messages resource of a fake REST API (reached by the real Twilio client).
A conversation is the user's E.164 number."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

from twilio.request_validator import RequestValidator

from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits.base import Ack, Inbound, Kit

ACCOUNT_SID = "AC" + "e" * 32
AUTH_TOKEN = "e2e-twilio-auth-token-0123456789"
FROM_NUMBER = "+15550001111"
USER = "+15557654321"
OTHER_USER = "+447700900123"
MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
BYE = "Session ended. Text again any time."
# Twilio's refusal to send to a number that opted out with Twilio itself (error 21610).
UNSUBSCRIBED = Answer(
    status=400,
    json_body={
        "code": 21610,
        "message": "Attempt to send to unsubscribed recipient",
        "more_info": "https://www.twilio.com/docs/errors/21610",
        "status": 400,
    },
)
_sids = itertools.count(1)


def new_sid() -> str:
    return f"SM{next(_sids):032x}"


def inbound_form(body: str, sender: str = USER, sid: str | None = None, **extra: str) -> dict[str, str]:
    """The form Twilio posts for an incoming SMS (fields as documented, more may come)."""
    sid = sid or new_sid()
    return {
        "ToCountry": "US",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "SmsSid": sid,
        "SmsStatus": "received",
        "Body": body,
        "To": FROM_NUMBER,
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": sender,
        "ApiVersion": "2010-04-01",
        **extra,
    }


def form_request(params: Mapping[str, str]) -> Inbound:
    """A form as an ``Inbound`` (its conversation is the sender, when there is one)."""
    return Inbound(dict(params), urlencode(params).encode(), params.get("From", ""))


def twilio_signature(url: str, params: Mapping[str, str], token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, dict(params)))


def basic_auth() -> str:
    return "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()


class TwilioKit(Kit):
    platform = "twilio"
    endpoint_name = "sms"
    credentials = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from_number": FROM_NUMBER}
    signature_header = "X-Twilio-Signature"
    reply_path = MESSAGES_PATH  # every SMS
    text_limit = 1600  # UTF-16 code units
    content_type = "application/x-www-form-urlencoded"
    ack = Ack(200, "text/xml", TWIML_EMPTY)
    conversations = (USER, OTHER_USER)
    bye = BYE
    # Twilio's default is 1 send/s per number (tests/test_ratelimit.py covers it); raised so
    # tests that answer a dozen messages do not wait a dozen seconds.
    rate_limit = {"per_second": 100}
    own_forged_cases = ("forged-base64",)
    malformed_bodies = {
        "no-message-sid": urlencode(
            {"AccountSid": ACCOUNT_SID, "From": USER, "To": FROM_NUMBER, "Body": "no sid"}
        ).encode(),
        "empty-message-sid": urlencode(
            {"MessageSid": "", "AccountSid": ACCOUNT_SID, "From": USER, "To": FROM_NUMBER, "Body": "empty sid"}
        ).encode(),
        "empty-form": b"",
        "no-from": urlencode(
            {"MessageSid": "SM1", "AccountSid": ACCOUNT_SID, "To": FROM_NUMBER, "Body": "no sender"}
        ).encode(),
        "garbage-num-media": urlencode({"MessageSid": "SM2", "From": USER, "Body": "", "NumMedia": "lots"}).encode(),
    }

    def text(
        self, text: str, *, conversation: str | None = None, user: str | None = None, event_id: str | None = None
    ) -> Inbound:
        number = user or conversation or USER
        assert conversation in (None, number), "a Twilio conversation is its user's number"
        return form_request(inbound_form(text, number, event_id))

    def redelivery(self, inbound: Inbound) -> Inbound:
        """Twilio retries the same form (the same MessageSid)."""
        return form_request(inbound.payload)

    def sign(self, body: bytes, url: str, *, secret: str | None = None) -> dict[str, str]:
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        return {self.signature_header: twilio_signature(url, params, secret or AUTH_TOKEN)}

    def forge(self, case: str, inbound: Inbound, url: str) -> tuple[bytes, dict[str, str]]:
        if case == "forged-base64":
            return inbound.body, {self.signature_header: "AAAAAAAAAAAAAAAAAAAAAAAAAAA="}
        return super().forge(case, inbound, url)

    def install(self, api: FakePlatform) -> None:
        api.respond(MESSAGES_PATH, lambda _request: self.sent())

    def sent(self) -> Answer:
        return Answer(status=201, json_body={"sid": new_sid(), "status": "queued", "account_sid": ACCOUNT_SID})

    def server_error(self) -> Answer:
        return Answer(status=500, json_body={"code": 20500, "message": "Internal", "status": 500})

    def rate_limited(self, retry_after_s: int) -> Answer:
        return Answer(
            status=429,
            json_body={"code": 20429, "message": "Too Many Requests", "status": 429},
            headers={"Retry-After": str(retry_after_s)},
        )

    def texts_of(self, request: RecordedRequest) -> list[tuple[str, str]]:
        form = request.form()
        return [(form["To"], form["Body"])]

    def check_reply(self, request: RecordedRequest, answering: Inbound, text: str) -> None:
        self.check_notice(request, answering.conversation, text)  # an SMS like any other

    def check_notice(self, request: RecordedRequest, conversation: str, text: str) -> None:
        assert (request.method, request.path) == ("POST", MESSAGES_PATH)
        assert request.headers["Authorization"] == basic_auth()
        form = request.form()
        assert (form["To"], form["From"], form["Body"]) == (conversation, FROM_NUMBER, text)


TWILIO = TwilioKit()
