"""The input of a mailing (receiver/destinations.py): destinations from CSV and JSON, chat settings,
send options and TWIN's limits, checked before anything is sent. Sending itself: tests/test_sending.py."""
from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest

from receiver import destinations
from receiver.destinations import InputError, chat_settings, read_csv, read_json

from .support import write

CHAT = {"chatId": "c", "botId": "b", "text": "t"}
FUTURE = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).replace(microsecond=0)


def problems_of(call, *args, **kwargs) -> list[str]:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return [str(p) for p in caught.value.problems]


# ------------------------------------------------------------------------------------ destinations
def test_phone_normalisation():
    assert destinations.normalize_phone("+7 (999) 123-45-67") == "79991234567"
    assert destinations.normalize_phone(79991234567) == "79991234567"
    assert destinations.normalize_phone("7999.123.45.67") == "79991234567"
    for bad in ("12ab", "123456789", "1234567890123456", "", "++79991234567", True, 7.9e10, None, "٧٩٩٩١٢٣٤٥٦٧"):
        assert destinations.normalize_phone(bad) is None, bad


def test_csv_reads_variables_in_order_with_line_numbers():
    text = "\ufeffPhone;messengerUserId;name\n\n+7 999 000-00-01;u1;Ivan\n79990000002;;\"Petrov; Ivan\"\n"
    rows = destinations.read_csv(text)
    assert [(d.index, d.line, d.phone, d.messenger_user_id, d.variables) for d in rows] == [
        (0, 3, "79990000001", "u1", {"name": "Ivan"}),
        (1, 4, "79990000002", None, {"name": "Petrov; Ivan"}),
    ]


@pytest.mark.parametrize("text, declared, expected", [
    ("phone,name\n79990000001,a\n12ab,b\n", None, "line 3, phone: '12ab' is not a phone number"),
    ("phone,name\n79990000001,a\n,b\n", None, "line 3, phone: is empty"),
    ("", None, "file: is empty"),
    ("\n  \n", None, "file: is empty"),
    ("phone,name\n", None, "file: has a header but no destinations"),
    ("tel,name\n79990000001,a\n", None, "line 1, phone: the header has no 'phone' column"),
    ("phone,,name\n79990000001,x,a\n", None, "line 1, column 2: has no name in the header"),
    ("phone,name,name\n79990000001,a,b\n", None, "line 1, column 3: 'name' appears twice"),
    ("phone,name,age\n79990000001,a,3\n", ("name",), "line 1, column 3: 'age' is an unknown column"),
    ("phone,name\n79990000001,a\n+7 999 000 00 01,b\n", None,
     "line 3, phone: 79990000001 is a duplicate of line 2"),
    ("phone,name\n79990000001,a,extra\n", None, "line 2: has 3 fields, the header has 2"),
    ("phone,messengerUserId\n79990000001," + "x" * 200 + "\n", None,
     "line 2, messengerUserId: is longer than 128"),
])
def test_bad_csv(text, declared, expected):
    with pytest.raises(destinations.InputError) as caught:
        destinations.read_csv(text, declared)
    assert expected in str(caught.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(destinations.InputError) as caught:
        destinations.read_csv("phone\n1\n79990000001\n2\n79990000001\n")
    assert [str(p).split(":")[0] for p in caught.value.problems] == [
        "line 2, phone", "line 4, phone", "line 5, phone"]


def test_json_shapes_and_line_numbers():
    text = json.dumps([{"phone": "79990000001", "variables": {"name": "Ivan"}, "age": 30},
                       {"phone": 79990000002, "messengerUserId": "u2"}], indent=2)
    rows = destinations.read_json(text)
    assert [(d.line, d.phone, d.messenger_user_id, d.variables) for d in rows] == [
        (2, "79990000001", None, {"name": "Ivan", "age": "30"}),
        (9, "79990000002", "u2", {}),
    ]
    assert len(destinations.read_json(json.dumps({"destinations": [{"phone": "79990000001"}]}))) == 1


@pytest.mark.parametrize("document, expected", [
    ("", "file: is empty"),
    ("[]", "file: has no destinations"),
    ("{\"phone\": 1}", "must be a JSON list of destinations"),
    ("[1, 2", "line 1: is not valid JSON"),
    ('[\n{"phone": "79990000001"},\n"x"]', "line 3 (item 2): must be an object"),
    ('[{"phone": "79990000001", "variables": [1]}]', "item 1), variables: must be an object"),
    ('[{"phone": "79990000001", "name": {"a": 1}}]', "item 1), name: a variable must be a string"),
    ('[{"phone": "79990000001", "name": "a", "variables": {"name": "b"}}]',
     "variables.name: is also given as the key 'name'"),
    ('[{"phone": "79990000001"},\n {"phone": "+79990000001"}]',
     "line 2 (item 2), phone: 79990000001 is a duplicate of line 1 (item 1)"),
    ('[{"phone": "79990000001", "x": "1"}]', "x: is not a declared variable"),
])
def test_bad_json(document, expected):
    declared = ("name",) if '"x"' in document else None
    with pytest.raises(destinations.InputError) as caught:
        destinations.read_json(document, declared)
    assert expected in str(caught.value)


def test_chat_settings(tmp_path):
    chat = destinations.chat_settings({"chatId": "c", "botId": "b", "text": "t"})
    assert chat.chat_json() == {"chatId": "c", "botId": "b", "messengerType": "WHATSAPP", "text": "t",
                                "provider": "TWIN"}
    with pytest.raises(destinations.InputError) as caught:
        destinations.chat_settings({"chatId": "c", "text": " ", "chatID": "x"})
    message = str(caught.value)
    assert "botId: is missing (give --bot-id" in message and "text: is missing" in message
    assert "chatID: is not a chat setting" in message
    toml = write(tmp_path, 'chatId = "c"\nbotId = "b"\ntext = "t"\nvariables = ["name"]\n', "chat.toml")
    assert destinations.chat_settings(destinations.load_config(toml)).variables == ("name",)
    ini = write(tmp_path, "[chat]\nchatId = c\nbotId = b\ntext = t\ncallbackData = 7\n", "chat.ini")
    assert destinations.chat_settings(destinations.load_config(ini)).callback_data == "7"
    bad = write(tmp_path, '{"chatId": "c", "bot": "b"}', "chat.json")
    with pytest.raises(destinations.InputError, match="bot: is not a chat setting"):
        destinations.load_config(bad)


def test_the_mailing_key_ignores_the_list_but_not_the_text_or_callback_data():
    base = dict(chatId="c", botId="b", text="t", callbackData="1")
    assert destinations.chat_settings(base).key == destinations.chat_settings(dict(base)).key
    assert destinations.chat_settings(base).key != destinations.chat_settings({**base, "text": "u"}).key
    assert destinations.chat_settings(base).key != destinations.chat_settings({**base, "callbackData": "2"}).key


# ------------------------------------------------------------------------------------ addressing
def test_a_destination_may_be_addressed_by_messenger_user_id_alone():
    rows = read_csv("messengerUserId,name\nwa-1,Ivan\n")
    assert [(d.phone, d.messenger_user_id, d.key) for d in rows] == [(None, "wa-1", "muid:wa-1")]
    assert rows[0].payload() == {"messengerUserId": "wa-1", "variables": {"name": "Ivan"}}
    mixed = read_json(json.dumps([{"messengerUserId": "tg-7"}, {"phone": "+79990000001", "messengerUserId": "x"}]))
    assert [(d.phone, d.key) for d in mixed] == [(None, "muid:tg-7"), ("79990000001", "79990000001")]
    assert mixed[1].payload() == {"phone": "79990000001", "messengerUserId": "x"}


def test_a_destination_needs_a_phone_or_a_messenger_user_id():
    problems = problems_of(read_csv, "phone,messengerUserId,name\n,,Ivan\n")
    assert problems == ["line 2, phone: is empty (give a phone, or a messengerUserId to address the destination "
                        "without one)"]
    assert "(item 1), phone: is empty" in problems_of(read_json, '[{"variables": {"name": "x"}}]')[0]
    header = problems_of(read_csv, "tel,name\n79990000001,a\n")[0]
    assert "the header has no 'phone' column" in header and "needs a 'messengerUserId' column" in header


def test_duplicates_are_found_by_phone_and_by_messenger_user_id():
    text = "phone,messengerUserId\n,wa-1\n79990000001,wa-2\n, wa-1 \n79990000002,wa-2\n"
    assert problems_of(read_csv, text) == ["line 4, messengerUserId: wa-1 is a duplicate of line 2",
                                           "line 5, messengerUserId: wa-2 is a duplicate of line 3"]


def test_a_long_messenger_user_id_gets_a_short_distinct_key():
    """outbox.phone (the row's identity, unique per send) holds 32 characters."""
    long_a, long_b = "a" * 100, "a" * 99 + "b"
    keys = {destinations.destination_key(None, muid) for muid in (long_a, long_b)}
    assert len(keys) == 2 and all(len(k) <= destinations.KEY_LENGTH and k.startswith("muid:") for k in keys)
    assert destinations.destination_key(None, "1234567890") == "muid:1234567890"
    assert destinations.phone_of_key("muid:1234567890") is None
    assert destinations.phone_of_key("79990000001") == "79990000001"


def test_external_id_is_a_destination_field_not_a_variable():
    rows = read_csv("phone,External_ID,name\n79990000001,crm-1,Ivan\n79990000002,,Petr\n", ("name",))
    assert [(d.external_id, d.variables) for d in rows] == [("crm-1", {"name": "Ivan"}), (None, {"name": "Petr"})]
    assert rows[0].payload() == {"phone": "79990000001", "externalId": "crm-1", "variables": {"name": "Ivan"}}
    item = read_json('[{"messengerUserId": "u", "externalId": 42, "variables": {"a": "1"}}]')[0]
    assert (item.external_id, item.variables) == ("42", {"a": "1"})


@pytest.mark.parametrize("document, expected", [
    ('[{"phone": "79990000001", "externalId": {"id": 1}}]', "item 1, externalId: must be a string"),
    ('[{"phone": "79990000001", "externalId": "' + "x" * 129 + '"}]',
     "item 1, externalId: is longer than 128 characters"),
    ('[{"phone": "79990000001", "variables": {"externalId": "x"}}]',
     "item 1, variables.externalId: 'externalId' cannot be a variable name"),
])
def test_bad_external_id(document, expected):
    assert expected in problems_of(destinations.destinations_from_items, json.loads(document))


# ------------------------------------------------------------------------------------ send options
def test_options_go_where_twin_takes_them():
    chat = chat_settings({**CHAT, "validityPeriod": 60, "continueLastOrStartNewSession": True,
                          "templateId": " tpl-1 ", "useShortLinks": False, "sendAt": FUTURE.isoformat(),
                          "allowedTimeRanges": [["09:00:00", "13:00:00"], ["14:00:00", "18:00:00"]]})
    assert chat.chat_json() == {"chatId": "c", "botId": "b", "messengerType": "WHATSAPP", "text": "t",
                                "provider": "TWIN", "validityPeriod": 60, "continueLastOrStartNewSession": True}
    assert chat.message_options() == {
        "templateId": "tpl-1", "useShortLinks": False, "sendAt": FUTURE.isoformat(),
        "allowedTimeRanges": [["09:00:00", "13:00:00"], ["14:00:00", "18:00:00"]]}
    assert chat_settings(CHAT).message_options() == {}


def test_send_at_is_sent_as_given_once_it_parses_with_an_offset():
    for given in ("2099-03-01T10:00:00+03:00", "2099-03-01 10:00:00Z", "2099-03-01T10:00:00.250-05:30"):
        assert chat_settings({**CHAT, "sendAt": given}).message_options() == {"sendAt": given}


@pytest.mark.parametrize("name, value, expected", [
    ("validityPeriod", 0, "must be a whole number of minutes from 1 to 2880 (48 hours), not '0'"),
    ("validityPeriod", 2881, "from 1 to 2880"),
    ("validityPeriod", "60", "from 1 to 2880"),
    ("validityPeriod", True, "from 1 to 2880"),
    ("validityPeriod", 1.5, "from 1 to 2880"),
    ("continueLastOrStartNewSession", "yes", "must be true or false"),
    ("useShortLinks", 1, "must be true or false"),
    ("templateId", 5, "must be a non-empty string"),
    ("templateId", " ", "must be a non-empty string"),
    ("sendAt", "tomorrow", "'tomorrow' is not an ISO 8601 date and time (e.g. 2025-03-01T10:00:00+03:00)"),
    ("sendAt", "2099-02-30T10:00:00+03:00", "is not an ISO 8601 date and time"),
    ("sendAt", "2099-03-01", "is not an ISO 8601 date and time"),
    ("sendAt", "2099-03-01T10:00:00", "has no zone offset"),
    ("sendAt", "2020-03-01T10:00:00+03:00", "2020-03-01T10:00:00+03:00 is in the past: give a later time"),
    ("allowedTimeRanges", [], 'must be a list of ["HH:MM:SS", "HH:MM:SS"] pairs'),
    ("allowedTimeRanges", ["09:00:00", "18:00:00"], "range 1: '09:00:00' is not a pair [start, end]"),
    ("allowedTimeRanges", [["9:00", "18:00:00"]], "range 1: '9:00' is not a time of day HH:MM:SS"),
    ("allowedTimeRanges", [["09:00:00", "18:00:00"], ["24:00:00", "23:00:00"]], "range 2: '24:00:00'"),
    ("allowedTimeRanges", [["22:00:00", "06:00:00"]], "range 1: 22:00:00-06:00:00 does not end after it starts"),
    ("allowedTimeRanges", "[[", "is not valid JSON"),
    ("allowedTimeRanges", {"from": "09:00:00"}, "must be a list of"),
])
def test_a_bad_option_is_named(name, value, expected):
    problems = problems_of(chat_settings, {**CHAT, name: value})
    assert len(problems) == 1 and problems[0].startswith(f"chat settings, {name}: ")
    assert expected in problems[0]


def test_time_ranges_may_be_written_as_text():
    chat = chat_settings({**CHAT, "allowedTimeRanges": "09:00:00-13:00:00, 14:00:00-18:00:00"})
    assert chat.message_options()["allowedTimeRanges"] == [["09:00:00", "13:00:00"], ["14:00:00", "18:00:00"]]


def test_a_past_send_at_is_kept_for_a_send_recorded_before():
    """The worker rebuilds a queued send's settings: a sendAt that has passed since is not a problem then."""
    chat = chat_settings({**CHAT, "sendAt": "2020-03-01T10:00:00+03:00"}, past_ok=True)
    assert chat.message_options() == {"sendAt": "2020-03-01T10:00:00+03:00"}


def test_options_from_every_kind_of_config_file(tmp_path):
    expected_chat = {"validityPeriod": 90, "continueLastOrStartNewSession": False}
    expected_message = {"useShortLinks": True, "sendAt": "2099-03-01T10:00:00+03:00",
                        "allowedTimeRanges": [["09:00:00", "18:00:00"]], "templateId": "tpl"}
    toml = write(tmp_path, 'chatId = "c"\nbotId = "b"\ntext = "t"\nvalidityPeriod = 90\n'
                 'continueLastOrStartNewSession = false\nuseShortLinks = true\ntemplateId = "tpl"\n'
                 "sendAt = 2099-03-01T10:00:00+03:00\nallowedTimeRanges = [[09:00:00, 18:00:00]]\n", "chat.toml")
    ini = write(tmp_path, "[chat]\nchatId = c\nbotId = b\ntext = t\nvalidityPeriod = 90\n"
                "continueLastOrStartNewSession = no\nuseShortLinks = yes\ntemplateId = tpl\n"
                "sendAt = 2099-03-01T10:00:00+03:00\nallowedTimeRanges = 09:00:00-18:00:00\n", "chat.ini")
    twin_shape = write(tmp_path, json.dumps({
        "chat": {**CHAT, **expected_chat}, "useShortLinks": True, "templateId": "tpl",
        "sendAt": "2099-03-01T10:00:00+03:00", "allowedTimeRanges": [["09:00:00", "18:00:00"]]}), "chat.json")
    for path in (toml, ini, twin_shape):
        chat = chat_settings(destinations.load_config(path))
        assert {k: chat.chat_json()[k] for k in expected_chat} == expected_chat, path
        assert chat.message_options() == expected_message, path


def test_a_bad_ini_option_is_named(tmp_path):
    ini = write(tmp_path, "[chat]\nchatId = c\nbotId = b\ntext = t\nuseShortLinks = sometimes\n"
                "validityPeriod = an hour\n", "chat.ini")
    problems = problems_of(chat_settings, destinations.load_config(ini))
    assert problems == ["chat settings, validityPeriod: must be a whole number of minutes from 1 to 2880 "
                        "(48 hours), not 'an hour'",
                        "chat settings, useShortLinks: must be true or false, not 'sometimes'"]


def test_the_mailing_key_keeps_delivery_options_out():
    """A rerun with a new sendAt (or time ranges, validity...) continues the same mailing: nothing sent
    is sent again. templateId changes what the recipients get: another mailing, like another text."""
    base = chat_settings({**CHAT, "callbackData": "1"})
    delivery = {"sendAt": FUTURE.isoformat(), "allowedTimeRanges": [["09:00:00", "18:00:00"]],
                "validityPeriod": 30, "useShortLinks": True, "continueLastOrStartNewSession": True}
    assert chat_settings({**CHAT, "callbackData": "1", **delivery}).key == base.key
    assert chat_settings({**CHAT, "callbackData": "1", "templateId": "tpl"}).key != base.key


def test_the_mailing_key_of_a_send_without_options_is_what_it_always_was():
    """Sends recorded before the options existed are found again by a rerun."""
    chat = {"chatId": "c", "botId": "b", "messengerType": "WHATSAPP", "text": "t", "provider": "TWIN"}
    canonical = json.dumps({"chat": chat, "callbackData": "1"}, sort_keys=True, separators=(",", ":"))
    assert chat_settings({**CHAT, "callbackData": "1"}).key == hashlib.sha256(canonical.encode()).hexdigest()


# ------------------------------------------------------------------------------------ TWIN's limits
def test_callback_data_over_10240_bytes_is_refused():
    assert chat_settings({**CHAT, "callbackData": "x" * 10240}).callback_data == "x" * 10240
    problems = problems_of(chat_settings, {**CHAT, "callbackData": "я" * 5121})     # 2 bytes each
    assert problems == ["chat settings, callbackData: is 10242 bytes (UTF-8); TWIN takes at most 10240"]


def test_callback_url_over_4000_bytes_is_refused_naming_the_settings_that_make_it():
    assert destinations.callback_url_problems("https://r.example/" + "a" * 3982) == []
    problem, = destinations.callback_url_problems("https://r.example/" + "ж" * 1992)
    assert (problem.field, problem.where) == ("callbackUrl", "settings")
    assert "is 4002 bytes; TWIN takes at most 4000" in problem.message and "PUBLIC_URL" in problem.message


def test_every_problem_of_the_chat_settings_is_named_in_the_order_of_the_checks():
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(microsecond=0).isoformat()
    values = {"zeta": 1, "chatID": "x", "botId": 5, "text": "a\x00", "callbackData": 7, "variables": [1],
              "validityPeriod": 0, "useShortLinks": "yes", "sendAt": past, "allowedTimeRanges": []}
    problems = problems_of(chat_settings, values)
    assert [p.split(":")[0] for p in problems] == [
        "chat settings, chatID", "chat settings, zeta", "chat settings, chatId", "chat settings, botId",
        "chat settings, text", "chat settings, callbackData", "chat settings, variables",
        "chat settings, validityPeriod", "chat settings, useShortLinks", "chat settings, allowedTimeRanges",
        "chat settings, sendAt"]
    assert problems[2:6] == ["chat settings, chatId: is missing (give --chat-id or put chatId in --config)",
                             "chat settings, botId: must be a string",
                             "chat settings, text: contains a NUL character",
                             "chat settings, callbackData: must be a string"]
    assert problems_of(chat_settings, {**CHAT, "callbackData": "a\x00" + "b" * 10240}) == [
        "chat settings, callbackData: contains a NUL character"]
    assert problems_of(chat_settings, {**CHAT, "variables": "name, , age", "sendAt": past, "chatId": " "}) == [
        "chat settings, chatId: is missing (give --chat-id or put chatId in --config)",
        f"chat settings, sendAt: {past} is in the past: give a later time, or leave sendAt out to send now"]
