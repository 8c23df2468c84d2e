"""Validation of a notify send body, shaped like TWIN's errors: 422 with `error` and `details` per field.

TWIN documents its options' types but not its checks: these are the plausible ones (docs/simulator.md).
"""
from __future__ import annotations

import datetime as dt
import re

PHONE = re.compile(r"^\+?\d{10,15}$")
TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")
CHAT_REQUIRED = ("chatId", "botId", "messengerType", "text")


class Invalid(Exception):
    def __init__(self, details: dict[str, str]) -> None:
        first = next(iter(details))
        super().__init__(f"Validation failed: {first}: {details[first]}")
        self.details = details


def validate_send(body) -> None:
    """Raise Invalid naming every bad field (path like messages[1].destinations[0].phone)."""
    details: dict[str, str] = {}
    if not isinstance(body, dict):
        raise Invalid({"body": "must be a JSON object"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid({"messages": "must be a non-empty list"})
    for i, message in enumerate(messages):
        _check_message(f"messages[{i}]", message, details)
    if details:
        raise Invalid(details)


def _check_message(path: str, message, details: dict[str, str]) -> None:
    if not isinstance(message, dict):
        details[path] = "must be an object"
        return
    _check_chat(path, message, details)
    _check_callback(path, message, details)
    _check_delivery_options(path, message, details)
    destinations = message.get("destinations")
    if not isinstance(destinations, list) or not destinations:
        details[f"{path}.destinations"] = "must be a non-empty list"
        return
    for j, destination in enumerate(destinations):
        _check_destination(f"{path}.destinations[{j}]", destination, details)


def _check_chat(path: str, message: dict, details: dict[str, str]) -> None:
    channels = message.get("channels")
    chat = channels.get("chat") if isinstance(channels, dict) else None
    if not isinstance(chat, dict):
        details[f"{path}.channels.chat"] = "is required and must be an object"
        return
    for key in CHAT_REQUIRED:
        value = chat.get(key)
        if not isinstance(value, str) or not value.strip():
            details[f"{path}.channels.chat.{key}"] = "is required and must be a non-empty string"
    _check_chat_options(f"{path}.channels.chat", chat, details)


def _check_callback(path: str, message: dict, details: dict[str, str]) -> None:
    """The string fields: callbackUrl, callbackData (with their sizes) and templateId."""
    for key in ("callbackUrl", "callbackData", "templateId"):
        if key in message and message[key] is not None and not isinstance(message[key], str):
            details[f"{path}.{key}"] = "must be a string"
    url = message.get("callbackUrl")
    if isinstance(url, str) and not url.startswith(("http://", "https://")):
        details[f"{path}.callbackUrl"] = "must be an http(s) URL"
    if isinstance(url, str) and len(url.encode("utf-8")) > 4000:
        details[f"{path}.callbackUrl"] = "must be at most 4000 bytes"
    data = message.get("callbackData")
    if isinstance(data, str) and len(data.encode("utf-8")) > 10240:
        details[f"{path}.callbackData"] = "must be at most 10240 bytes"


def _check_delivery_options(path: str, message: dict, details: dict[str, str]) -> None:
    if "useShortLinks" in message and not isinstance(message["useShortLinks"], bool):
        details[f"{path}.useShortLinks"] = "must be a boolean"
    if message.get("sendAt") is not None and not _is_datetime(message["sendAt"]):
        details[f"{path}.sendAt"] = "must be a date and time"
    if message.get("allowedTimeRanges") is not None and not _are_time_ranges(message["allowedTimeRanges"]):
        details[f"{path}.allowedTimeRanges"] = 'must be a list of ["HH:MM:SS", "HH:MM:SS"] pairs'


def _check_chat_options(path: str, chat: dict, details: dict[str, str]) -> None:
    period = chat.get("validityPeriod")
    if period is not None and (isinstance(period, bool) or not isinstance(period, int) or not 1 <= period <= 2880):
        details[f"{path}.validityPeriod"] = "must be a whole number of minutes from 1 to 2880"
    session = chat.get("continueLastOrStartNewSession")
    if session is not None and not isinstance(session, bool):
        details[f"{path}.continueLastOrStartNewSession"] = "must be a boolean"


def _is_datetime(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _are_time_ranges(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2
        and all(isinstance(t, str) and TIME_OF_DAY.match(t) for t in pair) for pair in value)


def _check_destination(path: str, destination, details: dict[str, str]) -> None:
    if not isinstance(destination, dict):
        details[path] = "must be an object"
        return
    phone, muid = destination.get("phone"), destination.get("messengerUserId")
    if muid is not None and (not isinstance(muid, str) or not muid.strip()):
        details[f"{path}.messengerUserId"] = "must be a non-empty string"
    if phone is None and isinstance(muid, str) and muid.strip():
        pass                                  # addressed by messengerUserId alone
    elif not isinstance(phone, str) or not PHONE.match(phone):
        details[f"{path}.phone"] = "is required unless messengerUserId is given: 10-15 digits, optional leading +"
    if destination.get("externalId") is not None and not isinstance(destination["externalId"], str):
        details[f"{path}.externalId"] = "must be a string"
    variables = destination.get("variables")
    if variables is not None and not isinstance(variables, dict):
        details[f"{path}.variables"] = "must be an object"
