"""Validation of a notify send body, shaped like TWIN's errors: 422 with `error` and `details` per field."""
from __future__ import annotations

import re

PHONE = re.compile(r"^\+?\d{10,15}$")
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
    channels = message.get("channels")
    chat = channels.get("chat") if isinstance(channels, dict) else None
    if not isinstance(chat, dict):
        details[f"{path}.channels.chat"] = "is required and must be an object"
    else:
        for key in CHAT_REQUIRED:
            value = chat.get(key)
            if not isinstance(value, str) or not value.strip():
                details[f"{path}.channels.chat.{key}"] = "is required and must be a non-empty string"
    for key in ("callbackUrl", "callbackData"):
        if key in message and message[key] is not None and not isinstance(message[key], str):
            details[f"{path}.{key}"] = "must be a string"
    url = message.get("callbackUrl")
    if isinstance(url, str) and not url.startswith(("http://", "https://")):
        details[f"{path}.callbackUrl"] = "must be an http(s) URL"
    if "useShortLinks" in message and not isinstance(message["useShortLinks"], bool):
        details[f"{path}.useShortLinks"] = "must be a boolean"
    destinations = message.get("destinations")
    if not isinstance(destinations, list) or not destinations:
        details[f"{path}.destinations"] = "must be a non-empty list"
        return
    for j, destination in enumerate(destinations):
        _check_destination(f"{path}.destinations[{j}]", destination, details)


def _check_destination(path: str, destination, details: dict[str, str]) -> None:
    if not isinstance(destination, dict):
        details[path] = "must be an object"
        return
    phone = destination.get("phone")
    if not isinstance(phone, str) or not PHONE.match(phone):
        details[f"{path}.phone"] = "is required: 10-15 digits, optional leading +"
    variables = destination.get("variables")
    if variables is not None and not isinstance(variables, dict):
        details[f"{path}.variables"] = "must be an object"
