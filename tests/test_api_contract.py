"""receiver/openapi.yaml is a contract, held by schemathesis: for every operation it makes requests the
document allows and requests it forbids, sends them to the real app on a throw-away database, and runs
every check it has on each answer (what `schemathesis run --checks all` does): no 5xx, only documented
status codes, content types, headers and bodies, requests the document allows accepted, requests it
forbids refused, authentication enforced where declared. The API token, the send token and the metrics
token go in the Authorization header; the callback token is the value of /callbacks/{token}.

Runtime is bounded by MAX_EXAMPLES per operation and phase, and the inputs are the same at every run
(SEED); another seed, or more examples, explores further (300 per operation pass too).
"""
from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from receiver import create_app, models
from receiver.api import openapi_document
from receiver.db import db

from .support import API_TOKEN, CALLBACK_TOKEN, SEND_TOKEN, TWIN_NEVER_CALLED, make_settings

METRICS_TOKEN = "test-metrics-token-0123456789abc"
MAX_EXAMPLES = 50
SEED = 13

# Rules the document states in words because a JSON schema cannot (one value against another, or
# against the clock; for /api/messages, that callbackData or id must be given). A request the schema
# allows may be refused for these, and only these.
SEND_RULES = ("is a duplicate of", "is not a declared variable", "is also given as the key", "is in the past",
              "does not end after it starts", "bytes (UTF-8); TWIN takes at most", "contains a NUL character")
RESULTS_RULES = (("until", "must be after since"), ("since", "outside the years 1 to 9999"),
                 ("until", "outside the years 1 to 9999"), ("cursor", "not a cursor this API gave out"))


@pytest.fixture
def contract_app(database_url):
    settings = make_settings(database_url, metrics_token=METRICS_TOKEN, **TWIN_NEVER_CALLED)
    app = create_app(settings)
    # One stored send, so that GET /api/sends/{send_id} has something to find (send #1).
    queued = app.test_client().post("/api/sends", headers={"Authorization": f"Bearer {SEND_TOKEN}"}, json={
        "chat": {"chatId": "chat-1", "botId": "bot-1", "text": "Hello"},
        "destinations": [{"phone": f"7999000000{n}"} for n in range(3)]})
    assert queued.status_code == 202, queued.get_json()
    # One webhook subscription with a pending event, so that GET /api/forwards lists one with an age.
    subscription = models.Subscription.create(url="http://127.0.0.1:9/hooks", secret="whsec_" + "A" * 32)
    models.Delivery.create(event_id="evt_contract", subscription=subscription.id, message_id="m-1",
                           event_type="message.result", payload="{}")
    yield app
    if not db.is_closed():
        db.close()


# The document the app serves (tests/test_openapi.py checks that it is this one), read when the tests are
# collected: schemathesis makes one test per operation from it.
schema = schemathesis.openapi.from_dict(
    openapi_document(), config=schemathesis.Config.from_dict({
        "seed": SEED,
        # The token of each security scheme of the document; the callback token as /callbacks/{token}.
        "auth": {"openapi": {"bearer": {"bearer": API_TOKEN}, "sendToken": {"bearer": SEND_TOKEN},
                             "metricsToken": {"bearer": METRICS_TOKEN}}},
        "parameters": {"path.token": CALLBACK_TOKEN},
        # A refusal for size (too many callbacks in an array) is a refusal too.
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415,
                                                                      422, 428, 429, "5xx"]}},
    }))


def refused_by_a_stated_rule(case, response) -> bool:
    """Whether a refusal names only rules the document states in words (SEND_RULES, RESULTS_RULES)."""
    if response.status_code not in (400, 422):
        return False
    answer = response.json()
    if (case.method, case.path) == ("POST", "/api/sends"):
        problems = answer.get("problems") or [{"message": ""}]
        return all(any(rule in problem["message"] for rule in SEND_RULES) for problem in problems)
    if case.path.startswith("/api/results"):
        return any(answer.get("parameter") == name and rule in answer.get("detail", "")
                   for name, rule in RESULTS_RULES)
    return case.path == "/api/messages" and answer.get("error") == "missing_parameter"


def accepts_valid_data(ctx, response, case):
    """schemathesis's positive_data_acceptance, but for the rules the document states in words."""
    if refused_by_a_stated_rule(case, response):
        return None
    return positive_data_acceptance(ctx, response, case)


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_the_app_keeps_the_contract(case, contract_app):
    # This test's app, for the request and for every probe a check sends after it.
    case.operation.app = case.operation.schema.app = contract_app
    case.call_and_validate(excluded_checks=[positive_data_acceptance], additional_checks=[accepts_valid_data])

