"""A session whose bot has not answered yet, in each form TWIN may write it ({}, [], null, no key), leaves
its message waiting; the real result that comes later is stored. Against the simulator over real HTTP."""
from __future__ import annotations

import json

import pytest

from receiver.models import Message
from receiver.worker import Worker

from .support import phones, send_mailing, wait_for

ABSENT = "(no key)"


def seen_result(message: Message):
    """dialogResultsFromBotJson in the session item the receiver last read, or ABSENT."""
    return json.loads(message.session).get("dialogResultsFromBotJson", ABSENT)


@pytest.mark.parametrize("form, shown", [("{}", {}), ("[]", []), ("null", None), ("missing", ABSENT)])
def test_an_empty_result_in_any_form_waits_for_the_real_one(twin, app, live_app, form, shown):
    twin.configure(empty_result=form, result_after=(1.5, 1.8), session_close_after=30.0)
    ids = send_mailing(twin, live_app.url, phones(3), callback_data=f"empty {form}")
    assert twin.wait_idle(timeout=20)
    enricher = Worker.from_app(app).enricher

    read = wait_for(lambda: [m for m in Message.select() if m.session], timeout=5,
                    step=lambda: enricher.run_once(force=True))

    assert len(read) == 3, "every session was read before the bot answered"
    for message in read:
        assert seen_result(message) == shown
        assert (message.stage, message.result, message.result_at) == ("result", None, None)
    truth = {t["id"]: t["result"] for t in twin.truth()}
    done = wait_for(lambda: Message.select().where(Message.stage == "done").count() == 3, timeout=15,
                    step=lambda: enricher.run_once(force=True))
    assert done
    for message_id in ids:
        stored = Message.get_by_id(message_id)
        assert json.loads(stored.result) == truth[message_id]
        assert isinstance(truth[message_id]["nps"], str)          # written as the recipe's example
