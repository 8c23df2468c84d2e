"""The `send` command (receiver/cli.py over receiver/sending.py) against the simulator."""
from __future__ import annotations

import datetime as dt
import json

from receiver.callbudget import CallBudget
from receiver.models import Message, Outbox, Send

from .support import (
    CALLBACK_TOKEN,
    CHAT,
    CHAT_JSON,
    QUIET,
    REFUSAL,
    closed_port,
    csv_text,
    outbox_states,
    run_cli,
    send_requests,
    sends_per_phone,
    write,
)

SIM_DEFAULTS = QUIET        # no callbacks while a test runs, unless it asks for them


def test_bad_input_sends_nothing(sim, sim_app, tmp_path):
    result = run_cli(sim_app, write(tmp_path, "phone,name\n79990000001,a\n12ab,b\n"), *CHAT)
    assert result.exit_code == 2
    assert "line 3, phone: '12ab' is not a phone number" in result.output
    result = run_cli(sim_app, write(tmp_path, csv_text(2), "ok.csv"), "--chat-id", "c", "--text", "t")
    assert result.exit_code == 2 and "botId: is missing" in result.output
    assert send_requests(sim) == 0 and Send.select().count() == 0


def test_a_cli_send_spends_the_call_budget_the_workers_share(make_sim_app, sim, tmp_path):
    app = make_sim_app(sim, twin24_max_calls_per_minute=10)
    result = run_cli(app, write(tmp_path, csv_text(3)), *CHAT)
    assert result.exit_code == 0, result.output
    assert send_requests(sim) == 1
    budget = CallBudget.from_settings(app.config["SETTINGS"])
    assert budget.free() == 9 - 1, "the workers see the send's call in the minute's budget (9 of 10 are theirs)"


def test_order_is_kept_for_many_destinations(sim, sim_app, tmp_path):
    path = write(tmp_path, csv_text(1200))
    result = run_cli(sim_app, path, *CHAT, "--batch-size", "500")
    assert result.exit_code == 0, result.output
    assert "sent now:" in result.output and "1200" in result.output
    assert send_requests(sim) == 3
    truth = {item["phone"]: item for item in sim.truth()}
    assert len(truth) == 1200
    stored = {m.phone: m for m in Message.select()}
    assert {phone: m.id for phone, m in stored.items()} == {phone: t["id"] for phone, t in truth.items()}
    for index in (0, 499, 500, 1199):
        phone = str(79990000000 + index)
        message = stored[phone]
        assert message.destination_index == index
        assert json.loads(message.variables) == {"name": f"Name {index}", "age": str(20 + index % 50)}
        assert message.messenger_user_id == phone and message.callback_data == "campaign-1"
        assert message.bulk_id == truth[phone]["bulkId"] and message.flow_id == truth[phone]["flowId"]
        assert message.send_id == Send.get().id and message.status == "CREATED"
    assert truth["79990000000"]["callbackUrl"] == \
        f"{sim_app.config['SETTINGS'].public_url}/callbacks/{CALLBACK_TOKEN}"
    assert outbox_states() == {"sent": 1200}
    assert sorted({row.batch for row in Outbox.select()}) == [1, 2, 3]
    # The same file again: everything was sent, nothing goes out.
    again = run_cli(sim_app, path, *CHAT, "--batch-size", "500")
    assert again.exit_code == 0 and "sent earlier:" in again.output
    assert send_requests(sim) == 3


def test_a_5xx_mid_list_is_unknown_and_never_resent_blindly(make_sim, make_sim_app, tmp_path):
    sim = make_sim(fail_sends=[1])
    app = make_sim_app(sim)
    path = write(tmp_path, csv_text(25))
    first = run_cli(app, path, *CHAT, "--batch-size", "10")
    assert first.exit_code == 1
    assert "sent now:" in first.output and "(lines 2-11)" in first.output
    assert "unknown outcome:" in first.output and "(lines 12-21)" in first.output
    assert "not sent:" in first.output and "(lines 22-26)" in first.output
    assert "stopped: outcome unknown" in first.output
    assert send_requests(sim) == 2 and outbox_states() == {"sent": 10, "unknown": 10, "pending": 5}

    # A rerun sends what provably did not go out, and reports the unknown rows without sending them.
    second = run_cli(app, path, *CHAT, "--batch-size", "10")
    assert second.exit_code == 1
    assert "unknown outcome:" in second.output and "(lines 12-21)" in second.output
    assert send_requests(sim) == 3 and outbox_states() == {"sent": 15, "unknown": 10}
    third = run_cli(app, path, *CHAT, "--batch-size", "10")
    assert send_requests(sim) == 3 and third.exit_code == 1
    counts = sends_per_phone(sim)
    assert len(counts) == 15 and set(counts.values()) == {1}

    # Only when asked, with a warning, are they sent again (here the 503 had taken nothing).
    fourth = run_cli(app, path, *CHAT, "--batch-size", "10", "--resend-unknown")
    assert fourth.exit_code == 0, fourth.output
    assert "may get the message twice" in fourth.output
    counts = sends_per_phone(sim)
    assert len(counts) == 25 and set(counts.values()) == {1}
    assert Message.select().where(Message.phone.is_null(False)).count() == 25


def test_connection_refused_sends_nothing_and_says_so(sim, make_sim_app, tmp_path):
    app = make_sim_app(sim, twin24_notify_url=f"http://127.0.0.1:{closed_port()}")
    path = write(tmp_path, csv_text(5))
    result = run_cli(app, path, *CHAT)
    assert result.exit_code == 1
    assert "not sent:" in result.output and "did not reach TWIN" in result.output
    assert outbox_states() == {"not_taken": 5}


def test_an_answer_dropped_after_accept_is_unknown_and_not_resent(make_sim, make_sim_app, tmp_path):
    sim = make_sim(drop_after_accept_sends=[1], drop_sleep=0)
    app = make_sim_app(sim)
    path = write(tmp_path, csv_text(12))
    first = run_cli(app, path, *CHAT, "--batch-size", "4")
    assert first.exit_code == 1 and "TWIN may have taken them" in first.output
    assert outbox_states() == {"sent": 4, "unknown": 4, "pending": 4}
    assert len(sends_per_phone(sim)) == 8          # TWIN has the 4 unknown ones: they were taken
    second = run_cli(app, path, *CHAT, "--batch-size", "4")
    assert second.exit_code == 1
    assert outbox_states() == {"sent": 8, "unknown": 4}
    counts = sends_per_phone(sim)
    assert len(counts) == 12 and set(counts.values()) == {1}


def test_changing_the_text_half_way_is_a_new_mailing_with_a_warning(sim, sim_app, tmp_path):
    path = write(tmp_path, csv_text(3))
    assert run_cli(sim_app, path, *CHAT).exit_code == 0
    changed = [*CHAT[:4], "--text", "Hello again", *CHAT[6:]]
    dry = run_cli(sim_app, path, *changed, "--dry-run")
    assert "warning: 3 of these destinations were already sent by send #1" in dry.output
    assert send_requests(sim) == 1


def test_dry_run_sends_and_records_nothing(sim, sim_app, tmp_path):
    result = run_cli(sim_app, write(tmp_path, csv_text(3)), *CHAT, "--dry-run")
    assert result.exit_code == 0 and "would be sent:" in result.output
    assert send_requests(sim) == 0 and Send.select().count() == 0


def test_json_file_and_config_file(sim, sim_app, tmp_path):
    path = write(tmp_path, json.dumps([{"phone": "79990000001", "variables": {"name": "A"}},
                                       {"phone": "79990000002", "name": "B"}]), "list.json")
    config = write(tmp_path, json.dumps({"chat": CHAT_JSON, "callbackData": "json-1"}), "chat.json")
    result = run_cli(sim_app, path, "--config", config)
    assert result.exit_code == 0, result.output
    truth = sim.truth()
    assert [(t["phone"], t["callbackData"], t["chatId"]) for t in truth] == [
        ("79990000001", "json-1", "chan-1"), ("79990000002", "json-1", "chan-1")]


def test_a_refused_destination_is_recorded_alone_and_the_run_goes_on(make_sim, make_sim_app, tmp_path):
    sim = make_sim(refuse_phones=["79990000001"])
    app = make_sim_app(sim)
    path = write(tmp_path, csv_text(5))                 # phones 79990000000-4 on lines 2-6
    first = run_cli(app, path, *CHAT, "--batch-size", "3")
    assert first.exit_code == 1, first.output           # not every row went out
    assert send_requests(sim) == 2 and "stopped" not in first.output
    rows = {row.phone: row for row in Outbox.select()}
    refused = rows.pop("79990000001")
    assert (refused.state, refused.message_id, refused.error) == ("refused", None, REFUSAL)
    kept = json.loads(refused.answer)                   # TWIN's whole item, its internals included
    assert kept["id"] is None and set(kept["error"]) == {"message", "file", "line", "trace"}
    # The others of the same request keep their ids, matched by position.
    truth = {t["phone"]: t["id"] for t in sim.truth()}
    assert {phone: row.message_id for phone, row in rows.items()} == truth and len(truth) == 4
    assert {row.state for row in rows.values()} == {"sent"}
    assert Message.select().where(Message.phone == "79990000001").count() == 0
    assert "refused by TWIN:" in first.output and "(lines 3)  this destination only; never resent" in first.output
    assert f"line 3, 79990000001: {REFUSAL}" in first.output
    assert "file" not in refused.error and "trace" not in first.output

    # Neither a rerun nor --resend-unknown sends it again.
    for extra in ((), ("--resend-unknown",)):
        again = run_cli(app, path, *CHAT, "--batch-size", "3", *extra)
        assert again.exit_code == 1 and "refused by TWIN:" in again.output
    assert send_requests(sim) == 2 and outbox_states() == {"sent": 4, "refused": 1}
    dry = run_cli(app, path, *CHAT, "--dry-run")
    assert "refused by TWIN:" in dry.output and "would be sent" not in dry.output


def test_options_reach_twin_and_a_new_send_at_continues_the_mailing(sim, sim_app, tmp_path):
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).replace(microsecond=0)
    config = write(tmp_path, json.dumps({
        **CHAT_JSON, "callbackData": "opts", "validityPeriod": 120, "continueLastOrStartNewSession": True,
        "templateId": "tpl-9", "useShortLinks": True, "sendAt": soon.isoformat(),
        "allowedTimeRanges": [["09:00:00", "18:00:00"]]}), "chat.json")
    path = write(tmp_path, "phone,messengerUserId,externalId,name\n79990000001,,crm-1,A\n,wa-2,crm-2,B\n")
    first = run_cli(sim_app, path, "--config", config)
    assert first.exit_code == 0, first.output
    one, two = sim.world.messages
    assert one.options == {"templateId": "tpl-9", "useShortLinks": True, "sendAt": soon.isoformat(),
                           "allowedTimeRanges": [["09:00:00", "18:00:00"]]}
    assert (one.chat["validityPeriod"], one.chat["continueLastOrStartNewSession"]) == (120, True)
    assert one.destination == {"phone": "79990000001", "externalId": "crm-1", "variables": {"name": "A"}}
    assert two.destination == {"messengerUserId": "wa-2", "externalId": "crm-2", "variables": {"name": "B"}}
    rows = list(Outbox.select().order_by(Outbox.row_index))
    assert [(r.phone, r.messenger_user_id, r.external_id, r.state) for r in rows] == [
        ("79990000001", None, "crm-1", "sent"), ("muid:wa-2", "wa-2", "crm-2", "sent")]

    # Later, one more destination and another time: only the new one goes out, with this run's options.
    later = (soon + dt.timedelta(days=1)).isoformat()
    longer = write(tmp_path, open(path, encoding="utf-8").read() + ",wa-3,,C\n", "more.csv")
    second = run_cli(sim_app, longer, "--config", config, "--send-at", later, "--validity-period", "30",
                     "--no-use-short-links", "--allowed-time-ranges", "10:00:00-12:00:00, 13:00:00-17:00:00")
    assert second.exit_code == 0, second.output
    assert "sent earlier:" in second.output and send_requests(sim) == 2 and Send.select().count() == 1
    three = sim.world.messages[2]
    assert three.destination == {"messengerUserId": "wa-3", "variables": {"name": "C"}}
    assert three.options == {"templateId": "tpl-9", "useShortLinks": False, "sendAt": later,
                             "allowedTimeRanges": [["10:00:00", "12:00:00"], ["13:00:00", "17:00:00"]]}
    assert three.chat["validityPeriod"] == 30
    assert json.loads(Send.get().options)["sendAt"] == later
