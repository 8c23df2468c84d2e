"""The input of a mailing: destinations (CSV or JSON) and chat settings, read and checked before
anything is sent (receiver/sending.py sends them; docs/sending.md is the user's side).

Every problem names the line (or item) and the field, and every problem of the input is reported at
once (`InputError.problems`), so a file is fixed in one go.
"""
from __future__ import annotations

import configparser
import csv
import hashlib
import io
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHONE_FIELD = "phone"
MUID_FIELD = "messengerUserId"
VARIABLES_FIELD = "variables"
MAX_PHONE_DIGITS, MIN_PHONE_DIGITS = 15, 10
MAX_MUID_LENGTH = 128
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
CONFIG_KEYS = tuple(name for name, *_ in CHAT_FIELDS) + ("callbackData", "variables")


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
    phone: str                      # digits only
    messenger_user_id: str | None
    variables: dict[str, str]

    def payload(self) -> dict:
        return destination_item(self.phone, self.messenger_user_id, self.variables)


def destination_item(phone: str, messenger_user_id: str | None, variables: dict[str, str] | None) -> dict:
    """One item of TWIN's `destinations`: the phone, and messengerUserId and variables when given."""
    item: dict[str, Any] = {"phone": phone}
    if messenger_user_id:
        item["messengerUserId"] = messenger_user_id
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

    def chat_json(self) -> dict:
        chat = {"chatId": self.chat_id, "botId": self.bot_id, "messengerType": self.messenger_type,
                "text": self.text, "provider": self.provider}
        if self.chat_session_name:
            chat["chatSessionName"] = self.chat_session_name
        return chat

    @property
    def key(self) -> str:
        """Which mailing this is: the chat settings and the callbackData (see receiver/sending.py)."""
        canonical = json.dumps({"chat": self.chat_json(), "callbackData": self.callback_data},
                               sort_keys=True, ensure_ascii=False, separators=(",", ":"))
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

    `fields` maps names to values: phone, messengerUserId, and variables (flat, already merged)."""
    problems: list[Problem] = []
    destinations: list[Destination] = []
    first_seen: dict[str, str] = {}
    for where, line, fields in rows:
        before = len(problems)
        raw_phone = fields.get(PHONE_FIELD)
        phone = normalize_phone(raw_phone)
        if raw_phone is None or (isinstance(raw_phone, str) and not raw_phone.strip()):
            problems.append(Problem(where, PHONE_FIELD, "is empty"))
        elif phone is None:
            problems.append(Problem(where, PHONE_FIELD, f"{_show(raw_phone)} is not a phone number "
                                    f"({MIN_PHONE_DIGITS}-{MAX_PHONE_DIGITS} digits, optional leading +)"))
        elif phone in first_seen:
            problems.append(Problem(where, PHONE_FIELD, f"{phone} is a duplicate of {first_seen[phone]}"))
        muid = fields.get(MUID_FIELD)
        if isinstance(muid, int) and not isinstance(muid, bool):
            muid = str(muid)
        if muid is not None and not isinstance(muid, str):
            problems.append(Problem(where, MUID_FIELD, "must be a string"))
        elif isinstance(muid, str):
            muid = muid.strip() or None
            if muid and len(muid) > MAX_MUID_LENGTH:
                problems.append(Problem(where, MUID_FIELD, f"is longer than {MAX_MUID_LENGTH} characters"))
        variables: dict[str, str] = {}
        for name, value in fields.items():
            if name in (PHONE_FIELD, MUID_FIELD):
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
        if len(problems) == before:
            first_seen[phone] = where
            destinations.append(Destination(len(destinations), line, phone, muid, variables))
        elif phone is not None and phone not in first_seen:
            first_seen[phone] = where
    if problems:
        raise InputError(problems)
    if not destinations:
        raise _file_error("has no destinations")
    return destinations


def _show(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def read_csv(text: str, declared: tuple[str, ...] | None = None) -> list[Destination]:
    """CSV with a header: `phone` (required), `messengerUserId` (optional), every other column a variable.

    The delimiter is a comma, a semicolon or a tab (whichever the header uses); a UTF-8 BOM is ignored;
    blank lines are skipped. Header names `phone` and `messengerUserId` match in any case."""
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
        if name.lower() == PHONE_FIELD.lower():
            name = PHONE_FIELD
        elif name.lower() in (MUID_FIELD.lower(), "messenger_user_id"):
            name = MUID_FIELD
        if not name:
            problems.append(Problem(f"line {line}", f"column {column}", "has no name in the header"))
        elif name in seen:
            problems.append(Problem(f"line {line}", f"column {column}", f"{name!r} appears twice in the header"))
        elif declared is not None and name not in (PHONE_FIELD, MUID_FIELD) and name not in declared:
            problems.append(Problem(f"line {line}", f"column {column}", f"{name!r} is an unknown column: "
                                    f"neither phone, messengerUserId nor a declared variable "
                                    f"({', '.join(declared) or 'none declared'})"))
        seen.add(name)
        names.append(name)
    if PHONE_FIELD not in seen:
        problems.append(Problem(f"line {line}", PHONE_FIELD, "the header has no 'phone' column "
                                f"(found: {', '.join(repr(n.strip()) for n in header)})"))
    return names


def read_json(text: str, declared: tuple[str, ...] | None = None) -> list[Destination]:
    """A JSON list of destination objects (or {"destinations": [...]}), each with `phone`, optional
    `messengerUserId`, and its variables either in a `variables` object, as flat keys, or both."""
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
        if not isinstance(item, dict):
            problems.append(Problem(where, None, "must be an object with a phone"))
            continue
        fields = {k: v for k, v in item.items() if k != VARIABLES_FIELD}
        nested = item.get(VARIABLES_FIELD)
        if nested is not None and not isinstance(nested, dict):
            problems.append(Problem(where, VARIABLES_FIELD, "must be an object"))
            continue
        for name, value in (nested or {}).items():
            if name in (PHONE_FIELD, MUID_FIELD):
                problems.append(Problem(where, f"{VARIABLES_FIELD}.{name}",
                                        f"{name!r} cannot be a variable name"))
                continue
            if name in fields:
                problems.append(Problem(where, f"{VARIABLES_FIELD}.{name}",
                                        f"is also given as the key {name!r}: keep one"))
            fields[name] = value
        rows.append((where, line, fields))
    if problems:
        raise InputError(problems)
    return _check_rows(rows, declared)


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
            config = dict(parser[section]) if section else {}
            if "variables" in config:
                config["variables"] = _name_list(config["variables"])
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


def chat_settings(values: dict, where: str = "chat settings") -> ChatSettings:
    """Check the chat settings (TWIN's names: chatId, botId, ...); every problem names the setting."""
    problems = _not_settings(where, values)
    found: dict[str, Any] = {}
    for name, option, required, default in CHAT_FIELDS:
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            value = default
        if value is None:
            if required:
                problems.append(Problem(where, name, f"is missing (give {option} or put {name} in --config)"))
            continue
        if not isinstance(value, str):
            problems.append(Problem(where, name, "must be a string"))
            continue
        found[name] = value.strip() if name != "text" else value
    callback_data = values.get("callbackData")
    if callback_data is not None and not isinstance(callback_data, str):
        problems.append(Problem(where, "callbackData", "must be a string"))
    declared = values.get("variables")
    if declared is not None:
        if isinstance(declared, str):
            declared = _name_list(declared)
        if not isinstance(declared, list) or not all(isinstance(v, str) and v for v in declared):
            problems.append(Problem(where, "variables", "must be a list of variable names"))
            declared = None
        else:
            declared = tuple(declared)
    if problems:
        raise InputError(problems)
    return ChatSettings(
        chat_id=found["chatId"], bot_id=found["botId"], text=found["text"],
        messenger_type=found["messengerType"].upper(), provider=found["provider"],
        chat_session_name=found.get("chatSessionName"), callback_data=callback_data or None,
        variables=declared)
