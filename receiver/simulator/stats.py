"""The analyse service's two statistics queries, and the ground truth, computed from the World.

Visibility is computed at query time from timestamps (no scheduled jobs): a session and its
providerMessageId appear `stats_lag` after delivery (the lag of that moment, kept on the session as
the record of when it became visible); a result appears at the bot's answer time, not before the
session.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import UTC, datetime

from .world import Message, Session, World

MESSAGE_FIELDS = ("id", "providerMessageId", "status", "statusCode", "createdAt", "deliveredAt",
                  "channel", "phone", "bulkId", "groupId", "flowId")
SESSION_FIELDS = ("id", "name", "clientId", "messengerType", "chatId", "channel", "status", "botStatus",
                  "startedAt", "lastMessageCreatedAt", "dialogResultsFromBotJson", "tags", "markedAsSpam")
ALWAYS = ("id",)   # a guess: TWIN always returns the item's id
SESSION_ALWAYS = ("id", "dialogResultsFromBotJson")   # the recipe gets it without asking


class BadQuery(Exception):
    def __init__(self, details: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in details.items()))
        self.details = details


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def parse_time(name: str, text: str | None) -> float:
    if not text:
        raise BadQuery({name: "is required (ISO 8601 with a zone offset)"})
    # A '+' sent unencoded in a query string arrives as a space: put it back.
    text = re.sub(r" (\d{2}:?\d{2})$", r"+\1", text.strip())
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery({name: f"is not an ISO 8601 date-time: {text!r}"}) from None
    if parsed.tzinfo is None:
        raise BadQuery({name: "must carry a zone offset, e.g. +00:00"})
    return parsed.timestamp()


def parse_int(args, names: tuple[str, ...], default: int, minimum: int) -> int:
    for name in names:
        if args.get(name) not in (None, ""):
            try:
                value = int(args[name])
            except ValueError:
                raise BadQuery({name: "must be an integer"}) from None
            if value < minimum:
                raise BadQuery({name: f"must be >= {minimum}"})
            return value
    return default


def truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def _query(args, world: World) -> tuple[float, float, int, int, set[str] | None]:
    start, end = parse_time("from", args.get("from")), parse_time("to", args.get("to"))
    if start > end:
        raise BadQuery({"from": "must not be after to"})
    page = parse_int(args, ("page", "pages"), 0, 0)       # 0-based; the recipe writes `pages`
    limit = min(parse_int(args, ("limit",), 100, 1), world.config.page_cap)
    fields = args.get("fields")
    wanted = {f.strip() for f in fields.split(",") if f.strip()} if fields else None
    return start, end, page, limit, wanted


def _order(items: list, key_time, world: World) -> list:
    if world.config.shuffle:
        # A seeded order that is the same for every page of the same query.
        seed = world.config.seed
        return sorted(items, key=lambda x: hashlib.sha256(f"{seed}:{x.id}".encode()).digest())
    return sorted(items, key=lambda x: (key_time(x), x.id))


def _project(full: dict, wanted: set[str] | None, always: tuple[str, ...]) -> dict:
    if wanted is None:
        return full
    return {k: v for k, v in full.items() if k in wanted or k in always}


def messages_stats(args, world: World) -> dict:
    start, end, page, limit, wanted = _query(args, world)
    channel = (args.get("channel") or "").upper()
    now = time.time()
    with world.lock:
        hits = [m for m in world.messages if start <= m.created_at <= end]
        if channel and channel != "CHAT":
            hits = []
        hits = _order(hits, lambda m: m.created_at, world)
        count = len(hits)
        items = [_project(_message_item(m, now), wanted, ALWAYS)
                 for m in hits[page * limit:(page + 1) * limit]]
    return {"count": count, "items": items}


def _message_item(m: Message, now: float) -> dict:
    visible = m.session is not None and m.session.visible_at <= now
    return {"id": m.id, "providerMessageId": m.session.id if visible else None,
            "status": m.status, "statusCode": m.history[-1][1], "createdAt": iso(m.created_at),
            "deliveredAt": iso(m.delivered_at), "channel": "CHAT", "phone": m.phone,
            "bulkId": m.bulk_id, "groupId": m.group_id, "flowId": m.flow_id}


def sessions_stats(args, world: World) -> dict:
    start, end, page, limit, wanted = _query(args, world)
    chat_id = args.get("chatId")
    now, config = time.time(), world.config
    with world.lock:
        hits = [s for s in world.sessions
                if start <= s.started_at <= end and s.visible_at <= now]
        # A chatId naming a known chat channel filters; any other value is ignored (see the API doc).
        if chat_id and chat_id in world.channel_ids:
            hits = [s for s in hits if s.chat_id == chat_id]
        hits = _order(hits, lambda s: s.started_at, world)
        answer: dict = {}
        if not truthy(args.get("withoutCount")):
            answer["count"] = len(hits)
        if not truthy(args.get("withoutItems")):
            answer["items"] = [_project(_session_item(s, now, config.empty_result), wanted, SESSION_ALWAYS)
                               for s in hits[page * limit:(page + 1) * limit]]
    return answer


def _session_item(s: Session, now: float, empty: str) -> dict:
    answered = s.answered_at is not None and s.answered_at <= now
    status = "CLOSED" if s.closed_at <= now else "ACTIVE"
    item = {"id": s.id, "name": s.name, "clientId": s.client_id, "messengerType": s.messenger_type,
            "chatId": s.chat_id, "channel": "CHAT", "status": status, "botStatus": status,
            "startedAt": iso(s.started_at),
            "lastMessageCreatedAt": iso(s.answered_at if answered else s.started_at),
            "dialogResultsFromBotJson": dict(s.result) if answered else None,
            "tags": [], "markedAsSpam": False}
    if not answered:
        # SimConfig.empty_result is "{}", "[]" or "null" as JSON, or "missing": no key at all.
        if empty == "missing":
            del item["dialogResultsFromBotJson"]
        else:
            item["dialogResultsFromBotJson"] = json.loads(empty)
    return item


def truth(world: World) -> list[dict]:
    """Every message with its eventual fate (a result is listed before the bot has answered)."""
    with world.lock:
        return [_truth_item(m) for m in world.messages]


def _truth_item(m: Message) -> dict:
    session = m.session
    return {"id": m.id, "phone": m.phone, "sendIndex": m.send_index, "messageIndex": m.message_index,
            "destinationIndex": m.destination_index, "position": m.position,
            "callbackData": m.callback_data, "callbackUrl": m.callback_url,
            "bulkId": m.bulk_id, "groupId": m.group_id, "flowId": m.flow_id,
            "chatId": m.chat.get("chatId"), "status": m.status, "statusCode": m.history[-1][1],
            "finalStatus": m.final_status, "finished": m.status == m.final_status,
            "history": [{"status": s, "code": c, "at": iso(t)} for s, c, t in m.history],
            "sessionId": session.id if session else None,
            "result": dict(session.result) if session and session.result is not None else None,
            "createdAt": iso(m.created_at), "deliveredAt": iso(m.delivered_at),
            "answeredAt": iso(session.answered_at) if session else None,
            # When the statistics first could give the chat id (providerMessageId, and the session in
            # the sessions statistics), and the bot's current result: a client's lag counts from these.
            "chatIdVisibleAt": iso(session.visible_at) if session else None,
            "resultVisibleAt": iso(session.result_visible_at) if session else None,
            "sessionClosedAt": iso(session.closed_at) if session else None}
