"""The input of a mailing: destinations (CSV or JSON), chat settings and send options, read and
checked before anything is sent (receiver/sending.py sends them; docs/sending.md is the user's side).

Every problem names the line (or item) and the field, and every problem of the input is reported at
once (`InputError.problems`), so a file is fixed in one go.
"""
from __future__ import annotations

import configparser
import csv
import datetime as dt
import hashlib
import io
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHONE_FIELD = "phone"
MUID_FIELD = "messengerUserId"
EXTERNAL_ID_FIELD = "externalId"
DESTINATION_FIELDS = (PHONE_FIELD, MUID_FIELD, EXTERNAL_ID_FIELD)     # never variables
VARIABLES_FIELD = "variables"
MAX_PHONE_DIGITS, MIN_PHONE_DIGITS = 15, 10
MAX_MUID_LENGTH = MAX_EXTERNAL_ID_LENGTH = 128
# A destination's identity within a mailing (outbox.phone, 32 characters): its phone, or for one
# addressed by messengerUserId alone "muid:<messengerUserId>" (a hash of it when that is too long).
MUID_KEY_PREFIX, KEY_LENGTH = "muid:", 32
# TWIN's limits (its wiki), in UTF-8 bytes.
MAX_CALLBACK_URL_BYTES, MAX_CALLBACK_DATA_BYTES = 4000, 10240
MAX_PROBLEMS_SHOWN = 20
_PHONE_NOISE = re.compile(r"[\s\-().\u00a0]")

# The chat settings: (name in TWIN's body, CLI option, required, default).
CHAT_FIELDS = (
    ("chatId", "--chat-id", True, None),
    ("botId", "--bot-id", True, None),
    ("messengerType", "--messenger-type", True, "WHATSAPP"),
    ("chatSessionName", "--chat-session-name", False, None),
    ("text", "--text", True, None),
    ("provider", "--provider", True, "TWIN"),
)
# Send options, by where they go in TWIN's body (docs/sending.md has the table).
CHAT_OPTIONS = ("validityPeriod", "continueLastOrStartNewSession")               # in channels.chat
MESSAGE_OPTIONS = ("templateId", "useShortLinks", "sendAt", "allowedTimeRanges")  # in the message object
OPTIONS = CHAT_OPTIONS + MESSAGE_OPTIONS
BOOLEAN_OPTIONS = ("useShortLinks", "continueLastOrStartNewSession")
# Options that change what a recipient gets, so a change makes another mailing (ChatSettings.key).
IDENTITY_OPTIONS = ("templateId",)
CONFIG_KEYS = tuple(name for name, *_ in CHAT_FIELDS) + OPTIONS + ("callbackData", "variables")
MAX_VALIDITY_MINUTES = 2880
_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
# CSV header names of the destination fields, in any letter case.
_HEADER_ALIASES = {PHONE_FIELD.lower(): PHONE_FIELD, MUID_FIELD.lower(): MUID_FIELD,
                   "messenger_user_id": MUID_FIELD, EXTERNAL_ID_FIELD.lower(): EXTERNAL_ID_FIELD,
                   "external_id": EXTERNAL_ID_FIELD}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (e.g. "line 7"), which field, what."""
    where: str
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}, {self.field}: {self.message}" if self.field else f"{self.where}: {self.message}"

    def as_json(self) -> dict:
        return {"where": self.where, "field": self.field, "message": self.message}


class InputError(ValueError):
    """The destinations or the chat settings are not usable; nothing was sent."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        super().__init__("\n".join(shown))


def _file_error(message: str) -> InputError:
    """A problem with the whole input (empty, no destinations, wrong shape), not with one row."""
    return InputError([Problem("file", None, message)])


@dataclass(frozen=True)
class Destination:
    index: int                      # 0-based position in the file (the destination index)
    line: int                       # line of the file (CSV, JSON file) or item number (API)
    phone: str | None               # digits only; None: addressed by messengerUserId alone
    messenger_user_id: str | None
    variables: dict[str, str]
    external_id: str | None = None  # the user's own id of this destination, passed to TWIN

    @property
    def key(self) -> str:
        """The destination's identity within its mailing (see destination_key)."""
        return destination_key(self.phone, self.messenger_user_id)

    def payload(self) -> dict:
        return destination_item(self.phone, self.messenger_user_id, self.variables, self.external_id)


def destination_key(phone: str | None, messenger_user_id: str | None) -> str:
    """The phone, or "muid:<messengerUserId>" for a destination without one. Never a phone (phones
    are digits), and at most KEY_LENGTH characters, so it fits outbox.phone and its unique index."""
    if phone:
        return phone
    key = MUID_KEY_PREFIX + (messenger_user_id or "")
    if len(key) <= KEY_LENGTH:
        return key
    digest = hashlib.sha256((messenger_user_id or "").encode("utf-8")).hexdigest()
    return f"{MUID_KEY_PREFIX}#{digest}"[:KEY_LENGTH]


def phone_of_key(key: str) -> str | None:
    """The phone a destination key holds, or None for a messengerUserId-only destination."""
    return None if key.startswith(MUID_KEY_PREFIX) else key


def destination_item(phone: str | None, messenger_user_id: str | None, variables: dict[str, str] | None,
                     external_id: str | None = None) -> dict:
    """One item of TWIN's `destinations`: phone, messengerUserId, externalId and variables, when given."""
    item: dict[str, Any] = {}
    if phone:
        item["phone"] = phone
    if messenger_user_id:
        item["messengerUserId"] = messenger_user_id
    if external_id:
        item["externalId"] = external_id
    if variables:
        item["variables"] = dict(variables)
    return item


@dataclass(frozen=True)
class ChatSettings:
    chat_id: str
    bot_id: str
    text: str
    messenger_type: str = "WHATSAPP"
    provider: str = "TWIN"
    chat_session_name: str | None = None
    callback_data: str | None = None
    variables: tuple[str, ...] | None = None   # declared variable names; None: any column is one
    options: dict[str, Any] = field(default_factory=dict)   # checked send options, by TWIN's names

    def _chat_identity(self) -> dict:
        chat = {"chatId": self.chat_id, "botId": self.bot_id, "messengerType": self.messenger_type,
                "text": self.text, "provider": self.provider}
        if self.chat_session_name:
            chat["chatSessionName"] = self.chat_session_name
        return chat

    def chat_json(self) -> dict:
        """channels.chat as sent to TWIN: the chat settings and the options that belong there."""
        return {**self._chat_identity(), **{k: v for k, v in self.options.items() if k in CHAT_OPTIONS}}

    def message_options(self) -> dict:
        """The options that go in the message object, beside channels, callbackUrl and destinations."""
        return {k: v for k, v in self.options.items() if k in MESSAGE_OPTIONS}

    @property
    def key(self) -> str:
        """Which mailing this is: what the recipients get (the chat settings, templateId) and the
        callbackData. When and how it is delivered (sendAt, allowedTimeRanges, validityPeriod, ...) is
        not part of it: a rerun with a new sendAt continues the mailing and never resends a sent row."""
        identity = {"chat": self._chat_identity(), "callbackData": self.callback_data}
        identity.update({k: v for k, v in self.options.items() if k in IDENTITY_OPTIONS})
        canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalize_phone(raw) -> str | None:
    """Digits only (a leading + and spaces, dashes, dots and brackets dropped), or None if not a phone."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, int):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    text = _PHONE_NOISE.sub("", raw.strip())
    if text.startswith("+"):
        text = text[1:]
    if not text.isascii() or not text.isdigit() or not MIN_PHONE_DIGITS <= len(text) <= MAX_PHONE_DIGITS:
        return None
    return text


def _check_rows(rows: Iterable[tuple[str, int, dict]], declared: tuple[str, ...] | None) -> list[Destination]:
    """Turn (where, line, fields) rows into destinations, or raise InputError naming every problem.

    `fields` maps names to values: phone, messengerUserId, externalId, and variables (flat, merged).
    A destination has a phone, or a messengerUserId alone; a phone or a messengerUserId given twice
    in one input is a duplicate (its person would get the message twice)."""
    problems: list[Problem] = []
    destinations: list[Destination] = []
    first_seen: dict[tuple[str, str], str] = {}          # (field, value) -> where it came first
    for where, line, fields in rows:
        before = len(problems)
        muid = _identifier(fields.get(MUID_FIELD), where, MUID_FIELD, MAX_MUID_LENGTH, problems)
        external_id = _identifier(fields.get(EXTERNAL_ID_FIELD), where, EXTERNAL_ID_FIELD,
                                  MAX_EXTERNAL_ID_LENGTH, problems)
        phone = _phone(fields.get(PHONE_FIELD), muid, where, problems)
        for name, value in ((PHONE_FIELD, phone), (MUID_FIELD, muid)):
            if value is None:
                continue
            if (name, value) in first_seen:
                problems.append(Problem(where, name, f"{value} is a duplicate of {first_seen[name, value]}"))
            else:
                first_seen[name, value] = where
        variables = _variables(fields, where, declared, problems)
        if len(problems) == before:
            destinations.append(Destination(len(destinations), line, phone, muid, variables, external_id))
    if problems:
        raise InputError(problems)
    if not destinations:
        raise _file_error("has no destinations")
    return destinations


def _phone(raw, muid: str | None, where: str, problems: list[Problem]) -> str | None:
    """The normalised phone; None when it is left out of a destination that has a messengerUserId."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if muid is None:
            problems.append(Problem(where, PHONE_FIELD, "is empty (give a phone, or a messengerUserId to "
                                    "address the destination without one)"))
        return None
    phone = normalize_phone(raw)
    if phone is None:
        problems.append(Problem(where, PHONE_FIELD, f"{_show(raw)} is not a phone number "
                                f"({MIN_PHONE_DIGITS}-{MAX_PHONE_DIGITS} digits, optional leading +)"))
    return phone


# PostgreSQL's text cannot hold NUL: a value that could be stored on SQLite only is refused on both.
NUL = "\x00"
HAS_NUL = "contains a NUL character"


def _identifier(value, where: str, name: str, longest: int, problems: list[Problem]) -> str | None:
    """messengerUserId or externalId: text (a whole number is taken as its digits), or None if empty."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(Problem(where, name, "must be a string"))
        return None
    if NUL in value:
        problems.append(Problem(where, name, HAS_NUL))    # kept: the destination is addressed, just not storable
    value = value.strip()
    if len(value) > longest:
        problems.append(Problem(where, name, f"is longer than {longest} characters"))
        return None
    return value or None


def _variables(fields: dict, where: str, declared: tuple[str, ...] | None,
               problems: list[Problem]) -> dict[str, str]:
    variables: dict[str, str] = {}
    for name, value in fields.items():
        if name in DESTINATION_FIELDS:
            continue
        if declared is not None and name not in declared:
            problems.append(Problem(where, name, "is not a declared variable (declared: "
                                    f"{', '.join(declared) or 'none'})"))
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = json.dumps(value)
        if value is None:
            value = ""
        if not isinstance(value, str):
            problems.append(Problem(where, name, "a variable must be a string or a number"))
            continue
        variables[name] = value
    return variables


def _show(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def read_csv(text: str, declared: tuple[str, ...] | None = None) -> list[Destination]:
    """CSV with a header: `phone` and/or `messengerUserId`, optional `externalId`, every other column a
    variable.

    The delimiter is a comma, a semicolon or a tab (whichever the header uses); a UTF-8 BOM is ignored;
    blank lines are skipped. Header names `phone`, `messengerUserId` and `externalId` match in any case
    (`messenger_user_id` and `external_id` too)."""
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise _file_error("is empty")
    header_line = text.splitlines()[0]
    delimiter = max((",", ";", "\t"), key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    names: list[str] = []
    rows: list[tuple[str, int, dict]] = []
    problems: list[Problem] = []
    last_line = 0
    try:
        for record in reader:
            line = last_line + 1                      # where this record starts
            last_line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = record
                names = _header_names(header, line, problems, declared)
                continue
            if len(record) != len(header):
                problems.append(Problem(f"line {line}", None, f"has {len(record)} fields, the header has "
                                        f"{len(header)} (a {delimiter!r} inside a value needs quotes)"))
                continue
            fields = {name: cell.strip() for name, cell in zip(names, record, strict=True)}
            rows.append((f"line {line}", line, fields))
    except csv.Error as error:
        raise InputError(problems + [Problem(f"line {reader.line_num}", None, f"is not valid CSV: {error}")]) \
            from None
    if header is None:
        raise _file_error("is empty")
    if problems:
        raise InputError(problems)
    if not rows:
        raise _file_error("has a header but no destinations")
    return _check_rows(rows, declared)


def _header_names(header: list[str], line: int, problems: list[Problem],
                  declared: tuple[str, ...] | None) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for column, raw in enumerate(header, start=1):
        name = raw.strip()
        name = _HEADER_ALIASES.get(name.lower(), name)
        if not name:
            problems.append(Problem(f"line {line}", f"column {column}", "has no name in the header"))
        elif name in seen:
            problems.append(Problem(f"line {line}", f"column {column}", f"{name!r} appears twice in the header"))
        elif declared is not None and name not in DESTINATION_FIELDS and name not in declared:
            problems.append(Problem(f"line {line}", f"column {column}", f"{name!r} is an unknown column: "
                                    f"neither phone, messengerUserId, externalId nor a declared variable "
                                    f"({', '.join(declared) or 'none declared'})"))
        seen.add(name)
        names.append(name)
    if PHONE_FIELD not in seen and MUID_FIELD not in seen:
        problems.append(Problem(f"line {line}", PHONE_FIELD, "the header has no 'phone' column "
                                f"(found: {', '.join(repr(n.strip()) for n in header)}); a list without "
                                "phones needs a 'messengerUserId' column"))
    return names



def read_json(text: str, declared: tuple[str, ...] | None = None) -> list[Destination]:
    """A JSON list of destination objects (or {"destinations": [...]}), each with `phone` and/or
    `messengerUserId`, optional `externalId`, and its variables either in a `variables` object, as flat
    keys, or both."""
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise _file_error("is empty")
    try:
        document = json.loads(text)
    except ValueError as error:
        raise InputError([Problem(f"line {getattr(error, 'lineno', '?')}", None,
                                  f"is not valid JSON: {getattr(error, 'msg', error)}")]) from None
    lines = _item_lines(text) if isinstance(document, list) else None
    return destinations_from_items(document, declared, lines)


def destinations_from_items(document, declared: tuple[str, ...] | None = None,
                            lines: list[int] | None = None) -> list[Destination]:
    """Destinations from parsed JSON (a file's content, or the API's `destinations`)."""
    if isinstance(document, dict) and "destinations" in document:
        document = document["destinations"]
        lines = None
    if not isinstance(document, list):
        raise _file_error('must be a JSON list of destinations (or an object with a "destinations" list)')
    if not document:
        raise _file_error("has no destinations")
    rows, problems = [], []
    for number, item in enumerate(document, start=1):
        line = lines[number - 1] if lines else number
        where = f"line {line} (item {number})" if lines else f"item {number}"
        fields = _item_fields(item, where, problems)
        if fields is not None:
            rows.append((where, line, fields))
    if problems:
        raise InputError(problems)
    return _check_rows(rows, declared)


def _item_fields(item, where: str, problems: list[Problem]) -> dict | None:
    """An item's fields with its `variables` object merged in flat; None when it is not an object, or its
    `variables` is not one."""
    if not isinstance(item, dict):
        problems.append(Problem(where, None, "must be an object with a phone or a messengerUserId"))
        return None
    nested = item.get(VARIABLES_FIELD)
    if nested is not None and not isinstance(nested, dict):
        problems.append(Problem(where, VARIABLES_FIELD, "must be an object"))
        return None
    fields = {k: v for k, v in item.items() if k != VARIABLES_FIELD}
    for name, value in (nested or {}).items():
        if name in DESTINATION_FIELDS:
            problems.append(Problem(where, f"{VARIABLES_FIELD}.{name}", f"{name!r} cannot be a variable name"))
            continue
        if name in fields:
            problems.append(Problem(where, f"{VARIABLES_FIELD}.{name}", f"is also given as the key {name!r}: keep one"))
        fields[name] = value
    return fields


def _item_lines(text: str) -> list[int] | None:
    """The line on which each item of a top-level JSON array starts."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    lines = []
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return lines
        lines.append(text.count("\n", 0, position) + 1)
        try:
            _, position = decoder.raw_decode(text, position)
        except ValueError:
            return None


def _unreadable(path: Path, error: OSError) -> InputError:
    return InputError([Problem(str(path), None, f"cannot be read: {error.strerror or error}")])


def read_destinations(path: str | Path, declared: tuple[str, ...] | None = None,
                      fmt: str | None = None) -> list[Destination]:
    """Read a CSV or JSON file (by its extension unless `fmt` says)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _unreadable(path, error) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError([Problem(f"line {line}", None, "is not UTF-8 text (save the file as UTF-8)")]) \
            from None
    fmt = (fmt or ("json" if path.suffix.lower() == ".json" else "csv")).lower()
    if fmt == "json":
        return read_json(text, declared)
    return read_csv(text, declared)


def _name_list(text: str) -> list[str]:
    """'name, age' -> ['name', 'age'] (the variables of --variables and of an INI file)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _not_settings(where: str, names: Iterable[str]) -> list[Problem]:
    """A problem for each name that is not a chat setting (a typo such as chatID is never ignored)."""
    return [Problem(where, name, f"is not a chat setting (known: {', '.join(CONFIG_KEYS)})")
            for name in sorted(set(names) - set(CONFIG_KEYS))]


def load_config(path: str | Path) -> dict:
    """Chat settings from a small JSON, TOML or INI file (INI: a [chat] section, or the first one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise _unreadable(path, error) from None
    except UnicodeDecodeError:
        raise InputError([Problem(str(path), None, "is not UTF-8 text")]) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            config = tomllib.loads(text)
        elif suffix in (".ini", ".cfg"):
            parser = configparser.ConfigParser(interpolation=None)
            parser.optionxform = str                      # keep chatId's case
            parser.read_string(text)
            section = "chat" if parser.has_section("chat") else (parser.sections() or [None])[0]
            config = _ini_values(dict(parser[section])) if section else {}
        else:
            config = json.loads(text)
    except (ValueError, configparser.Error) as error:
        raise InputError([Problem(str(path), None, f"cannot be parsed: {error}")]) from None
    if isinstance(config, dict) and isinstance(config.get("chat"), dict) and suffix != ".ini":
        # TWIN's own shape is fine too: {"chat": {...}, "callbackData": "..."}
        config = {**config["chat"], **{k: v for k, v in config.items() if k != "chat"}}
    if not isinstance(config, dict):
        raise InputError([Problem(str(path), None, "must hold an object of chat settings")])
    unknown = _not_settings(str(path), config)
    if unknown:
        raise InputError(unknown)
    return config


def _ini_values(config: dict[str, str]) -> dict:
    """An INI section's text made typed where a setting is not text (a bad value is left as text,
    for chat_settings to name)."""
    if "variables" in config:
        config["variables"] = _name_list(config["variables"])
    for name in BOOLEAN_OPTIONS:
        if config.get(name, "").strip().lower() in configparser.ConfigParser.BOOLEAN_STATES:
            config[name] = configparser.ConfigParser.BOOLEAN_STATES[config[name].strip().lower()]
    if config.get("validityPeriod", "").strip().isdigit():
        config["validityPeriod"] = int(config["validityPeriod"])
    return config


def callback_url_problems(url: str, where: str = "settings") -> list[Problem]:
    """TWIN's limit on callbackUrl. The URL is the receiver's own (PUBLIC_URL + /callbacks/ + the
    callback token), so the problem says which settings make it."""
    size = len(url.encode("utf-8"))
    if size <= MAX_CALLBACK_URL_BYTES:
        return []
    return [Problem(where, "callbackUrl", f"is {size} bytes; TWIN takes at most {MAX_CALLBACK_URL_BYTES}. It "
                    "is PUBLIC_URL + /callbacks/ + the callback token: shorten PUBLIC_URL (or CALLBACK_TOKEN)")]


def chat_settings(values: dict, where: str = "chat settings", *, past_ok: bool = False) -> ChatSettings:
    """Check the chat settings (TWIN's names: chatId, botId, ...) and the send options; every problem
    names the setting. `past_ok`: a sendAt already past is kept (a send recorded when it was not)."""
    problems = _not_settings(where, values)
    found = _chat_fields(values, where, problems)
    callback_data = _callback_data(values.get("callbackData"), where, problems)
    declared = _declared_variables(values.get("variables"), where, problems)
    options = _send_options(values, where, problems, past_ok)
    if problems:
        raise InputError(problems)
    return ChatSettings(
        chat_id=found["chatId"], bot_id=found["botId"], text=found["text"],
        messenger_type=found["messengerType"].upper(), provider=found["provider"],
        chat_session_name=found.get("chatSessionName"), callback_data=callback_data or None,
        variables=declared, options=options)


def _chat_fields(values: dict, where: str, problems: list[Problem]) -> dict[str, str]:
    """The CHAT_FIELDS given (or defaulted), by name: stripped, but the text kept as written."""
    found: dict[str, str] = {}
    for name, option, required, default in CHAT_FIELDS:
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            value = default
        if value is None:
            if required:
                problems.append(Problem(where, name, f"is missing (give {option} or put {name} in --config)"))
            continue
        problem = _not_text(value)
        if problem:
            problems.append(Problem(where, name, problem))
            continue
        found[name] = value.strip() if name != "text" else value
    return found


def _not_text(value) -> str | None:
    """Why a setting's value is not text that TWIN and both databases take; None when it is."""
    if not isinstance(value, str):
        return "must be a string"
    if NUL in value:
        return HAS_NUL
    return None


def _callback_data(value, where: str, problems: list[Problem]):
    """callbackData as given (None: none): text of at most TWIN's MAX_CALLBACK_DATA_BYTES."""
    if value is None:
        return None
    problem = _not_text(value)
    if problem is None and len(value.encode("utf-8")) > MAX_CALLBACK_DATA_BYTES:
        problem = f"is {len(value.encode('utf-8'))} bytes (UTF-8); TWIN takes at most {MAX_CALLBACK_DATA_BYTES}"
    if problem:
        problems.append(Problem(where, "callbackData", problem))
    return value


def _declared_variables(declared, where: str, problems: list[Problem]) -> tuple[str, ...] | None:
    """The declared variable names (a list, or "name, age" text); None: none declared, any column is one."""
    if declared is None:
        return None
    if isinstance(declared, str):
        declared = _name_list(declared)
    if not isinstance(declared, list) or not all(isinstance(v, str) and v for v in declared):
        problems.append(Problem(where, "variables", "must be a list of variable names"))
        return None
    return tuple(declared)


def _send_options(values: dict, where: str, problems: list[Problem], past_ok: bool) -> dict[str, Any]:
    """The send options given, checked and in the form TWIN gets them."""
    options: dict[str, Any] = {}
    for name in OPTIONS:
        value = values.get(name)
        if value is None:
            continue
        try:
            options[name] = _OPTION_CHECKS[name](value)
        except ValueError as error:
            problems.append(Problem(where, name, str(error)))
    if "sendAt" in options and not past_ok:
        when = dt.datetime.fromisoformat(options["sendAt"])
        if when < dt.datetime.now(dt.UTC):
            problems.append(Problem(where, "sendAt", f"{options['sendAt']} is in the past: give a later time, "
                                    "or leave sendAt out to send now"))
    return options


def _text_option(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _bool_option(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_show(value)}")
    return value


def _validity_period(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VALIDITY_MINUTES:
        raise ValueError(f"must be a whole number of minutes from 1 to {MAX_VALIDITY_MINUTES} (48 hours), "
                         f"not {_show(value)}")
    return value


def _send_at(value) -> str:
    """An ISO 8601 date and time with a zone offset, sent as given (a TOML datetime as ISO text)."""
    if isinstance(value, dt.datetime):
        value = value.isoformat()
    example = "e.g. 2025-03-01T10:00:00+03:00"
    if not isinstance(value, str) or not _DATE_TIME.match(value.strip()):
        raise ValueError(f"{_show(value)} is not an ISO 8601 date and time ({example})")
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{_show(value)} is not an ISO 8601 date and time ({example})") from None
    if when.tzinfo is None:
        raise ValueError(f"{_show(value)} has no zone offset: add one ({example}, or Z for UTC); TWIN does "
                         "not say which zone a bare time is in")
    return value.strip()


def _time_ranges(value) -> list[list[str]]:
    """[["HH:MM:SS", "HH:MM:SS"], ...]; also written "09:00:00-13:00:00, 14:00:00-18:00:00" (the CLI, INI)."""
    shape = 'must be a list of ["HH:MM:SS", "HH:MM:SS"] pairs'
    if isinstance(value, str):
        value = _time_ranges_text(value, shape)
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(shape)
    ranges = []
    for number, pair in enumerate(value, start=1):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"range {number}: {_show(pair)} is not a pair [start, end]; {shape}")
        start, end = (_time_of_day(t, number) for t in pair)
        if start >= end:
            raise ValueError(f"range {number}: {start}-{end} does not end after it starts (a range over "
                             "midnight is two ranges: [start, 23:59:59] and [00:00:00, end])")
        ranges.append([start, end])
    return ranges


def _time_ranges_text(text: str, shape: str):
    if text.strip().startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"is not valid JSON; {shape}") from None
    return [part.strip().split("-") for part in text.split(",") if part.strip()]


def _time_of_day(value, number: int) -> str:
    if isinstance(value, dt.time):          # TOML writes 09:00:00 unquoted as a time
        value = value.isoformat()
    if not isinstance(value, str) or not _TIME_OF_DAY.match(value.strip()):
        raise ValueError(f"range {number}: {_show(value)} is not a time of day HH:MM:SS (00:00:00-23:59:59)")
    return value.strip()


_OPTION_CHECKS = {"validityPeriod": _validity_period, "continueLastOrStartNewSession": _bool_option,
                  "templateId": _text_option, "useShortLinks": _bool_option, "sendAt": _send_at,
                  "allowedTimeRanges": _time_ranges}
