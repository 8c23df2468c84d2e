"""The simulated TWIN's state: messages, their lifecycles, chat sessions, call counts, ground truth.

Every random choice about a message is drawn from that message's own Random, itself drawn from the
seed in request order, so the same requests give the same fates whatever the thread timing.
"""
from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from .callbacks import CallbackSender
from .config import SimConfig
from .scheduler import Scheduler

# PENDING=2 and DELIVERED=6 are documented; the other codes are guesses (see docs/simulator.md).
STATUS_CODES = {"CREATED": 1, "PENDING": 2, "DELIVERED": 6, "UNDELIVERED": 7, "ERROR": 8,
                "EXPIRED": 9}   # EXPIRED's code is a guess too: TWIN publishes none


def now_ms() -> float:
    """Epoch seconds truncated to milliseconds, the precision the statistics print."""
    return math.floor(time.time() * 1000) / 1000


def seeded_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# The message object's keys kept elsewhere on a Message; the rest (sendAt, templateId, ...) in `options`.
OWN_KEYS = ("channels", "destinations", "callbackUrl", "callbackData")


def refused_item(destination: dict, bulk_id: str, group_id: str) -> dict:
    """The answer item of a refused destination, shaped like TWIN's (id and status null, an error object)."""
    who = destination.get("phone") or destination.get("messengerUserId")
    return {"id": None, "bulkId": bulk_id, "groupId": group_id, "flowId": None, "status": None,
            "channel": "CHAT", "error": {"message": f"Recipient {who} cannot receive messages on this channel",
                                         "file": "/app/src/Notify/Service/MessageService.php", "line": 214,
                                         "trace": "#0 /app/src/Notify/Controller/MessageController.php(87)"}}


def final_status(config: SimConfig, roll: float) -> str:
    """Where a message ends, from one draw in [0, 1): the failure shares first, DELIVERED the rest."""
    for status, share in (("UNDELIVERED", config.undelivered_rate), ("ERROR", config.error_rate_status),
                          ("EXPIRED", config.expired_rate)):
        if roll < share:
            return status
        roll -= share
    return "DELIVERED"


@dataclass
class Session:
    id: str
    name: str
    client_id: str
    messenger_type: str
    chat_id: str
    started_at: float
    closed_at: float                  # answered_at, or started_at + session_close_after
    answered_at: float | None = None
    result: dict | None = None
    message_id: str | None = None     # None: a padding session (someone else's chat)
    visible_at: float = 0.0           # when the statistics first list it (start + stats_lag of then)
    result_visible_at: float | None = None   # when the statistics first show its current result


@dataclass
class Message:
    id: str
    bulk_id: str
    group_id: str
    flow_id: str
    send_index: int
    message_index: int
    destination_index: int
    position: int                     # index in the send answer
    phone: str | None                 # None: addressed by messengerUserId alone
    variables: dict
    callback_url: str | None
    callback_data: str | None
    has_callback_data: bool
    chat: dict
    created_at: float
    rng: random.Random
    final_status: str
    status: str = "CREATED"
    history: list = field(default_factory=list)
    reorder: bool = False
    held: list = field(default_factory=list)   # callbacks kept back to be sent shuffled
    delivered_at: float | None = None
    session: Session | None = None
    destination: dict = field(default_factory=dict)   # the destination as received (externalId, ...)
    options: dict = field(default_factory=dict)       # the message object's other keys (sendAt, ...)


class World:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.messages: list[Message] = []
        self.sessions: list[Session] = []
        self.channel_ids: set[str] = set()
        self._ids = random.Random(f"{config.seed}:ids")
        self._fates = random.Random(f"{config.seed}:fates")
        self._calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._call_log: list[tuple[float, str, str]] = []   # (epoch of arrival, endpoint, outcome), API calls
        self.send_count = 0
        self.scheduler = Scheduler()
        self.callbacks = CallbackSender(self.scheduler, lambda: self.config, self.count)

    def start(self) -> None:
        self.scheduler.start()
        self.callbacks.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.callbacks.stop()

    # ---- bookkeeping -------------------------------------------------------------------------
    def count(self, endpoint: str, outcome: str) -> None:
        with self.lock:
            self._calls[endpoint][outcome] += 1

    def log_call(self, endpoint: str, outcome: str, arrived: float) -> None:
        """Count a call to TWIN's API, and keep when it arrived (a client's rate is judged on these)."""
        with self.lock:
            self._calls[endpoint][outcome] += 1
            self._call_log.append((arrived, endpoint, outcome))

    def calls(self) -> dict:
        with self.lock:
            return {name: dict(outcomes) for name, outcomes in self._calls.items()}

    def call_log(self) -> list[tuple[float, str, str]]:
        with self.lock:
            return list(self._call_log)

    def idle(self) -> bool:
        return self.scheduler.pending() == 0 and self.callbacks.outstanding() == 0

    def next_send_index(self) -> int:
        with self.lock:
            index = self.send_count
            self.send_count += 1
            return index

    # ---- send --------------------------------------------------------------------------------
    def accept(self, body: dict, send_index: int) -> list[dict]:
        """Take a validated send: create every message, schedule its lifecycle, return the answer."""
        config = self.config
        answer = []
        with self.lock:
            bulk_id = seeded_uuid(self._ids)
            for i, spec in enumerate(body["messages"]):
                group_id, flow_id = seeded_uuid(self._ids), seeded_uuid(self._ids)
                chat = spec["channels"]["chat"]
                self.channel_ids.add(chat["chatId"])
                for j, destination in enumerate(spec["destinations"]):
                    if self._refused(config, destination, send_index, i, j):
                        answer.append(refused_item(destination, bulk_id, group_id))
                        continue
                    message = self._new_message(config, spec, chat, destination, bulk_id, group_id,
                                                flow_id, send_index, i, j, len(answer))
                    self.messages.append(message)
                    answer.append({"id": message.id, "bulkId": bulk_id, "groupId": group_id,
                                   "flowId": flow_id, "status": "CREATED", "channel": "CHAT",
                                   "error": None})
                    delay = message.rng.uniform(*config.pending_after)
                    self.scheduler.at(message.created_at + delay, lambda m=message: self._to_pending(m))
        return answer

    @staticmethod
    def _refused(config: SimConfig, destination: dict, send_index: int, i: int, j: int) -> bool:
        """Refused by name (refuse_phones) or by a draw of its own, so other fates stay as they were."""
        who = destination.get("phone") or destination.get("messengerUserId")
        if who in config.refuse_phones:
            return True
        return config.refuse_rate > 0 and \
            random.Random(f"{config.seed}:refuse:{send_index}:{i}:{j}").random() < config.refuse_rate

    def _new_message(self, config, spec, chat, destination, bulk_id, group_id, flow_id,
                     send_index, i, j, position) -> Message:
        rng = random.Random(self._fates.getrandbits(64))
        final = final_status(config, rng.random())
        created = now_ms()
        message = Message(
            id=seeded_uuid(self._ids), bulk_id=bulk_id, group_id=group_id, flow_id=flow_id,
            send_index=send_index, message_index=i, destination_index=j, position=position,
            phone=destination.get("phone"), variables=dict(destination.get("variables") or {}),
            callback_url=spec.get("callbackUrl"), callback_data=spec.get("callbackData"),
            has_callback_data="callbackData" in spec, chat=dict(chat), created_at=created,
            rng=rng, final_status=final, reorder=rng.random() < config.reorder_callbacks,
            destination=dict(destination), options={k: v for k, v in spec.items() if k not in OWN_KEYS})
        message.history.append(("CREATED", STATUS_CODES["CREATED"], created))
        return message

    # ---- lifecycle ---------------------------------------------------------------------------
    def _to_pending(self, message: Message) -> None:
        with self.lock:
            self._change(message, "PENDING")
            delay = message.rng.uniform(*self.config.final_after)
        self.scheduler.after(delay, lambda: self._to_final(message))

    def _to_final(self, message: Message) -> None:
        with self.lock:
            self._change(message, message.final_status)
            if message.final_status == "DELIVERED":
                self._start_session(message, message.history[-1][2])
            self._release_held(message)

    def _change(self, message: Message, new: str) -> None:
        old = message.status
        at = now_ms()
        message.status = new
        message.history.append((new, STATUS_CODES[new], at))
        payload = {"id": message.id, "bulkId": message.bulk_id, "groupId": message.group_id,
                   "flowId": message.flow_id, "oldStatus": old, "newStatus": new,
                   "oldStatusCode": STATUS_CODES[old], "newStatusCode": STATUS_CODES[new],
                   "price": self.config.price if new == "DELIVERED" else 0, "partCount": 1}
        if message.has_callback_data:
            payload["callbackData"] = message.callback_data
        if not message.callback_url:
            return
        if message.reorder:
            message.held.append(payload)
        else:
            self._send(message, payload, 0.0)

    def _release_held(self, message: Message) -> None:
        """Send the callbacks kept back, in an order that is not the true one."""
        held, message.held = message.held, []
        if len(held) > 1:
            shuffled = held[:]
            while shuffled == held:
                message.rng.shuffle(shuffled)
            held = shuffled
        for k, payload in enumerate(held):
            # Staggered so the worker pool cannot undo the shuffle by racing.
            self._send(message, payload, 0.03 * k)

    def _send(self, message: Message, payload: dict, delay: float) -> None:
        self.callbacks.submit(message.callback_url, payload, delay)
        if message.rng.random() < self.config.duplicate_callbacks:
            self.callbacks.submit(message.callback_url, payload, delay + message.rng.uniform(0.01, 0.05))

    def _start_session(self, message: Message, started: float) -> None:
        config, rng = self.config, message.rng
        message.delivered_at = started
        chat = message.chat
        session = Session(id=seeded_uuid(rng), name=chat.get("chatSessionName") or "", message_id=message.id,
                          client_id=seeded_uuid(rng), messenger_type=chat["messengerType"],
                          chat_id=chat["chatId"], started_at=started,
                          closed_at=started + config.session_close_after,
                          visible_at=started + config.stats_lag)
        if rng.random() >= config.no_reply_rate:
            session.answered_at = round(started + rng.uniform(*config.result_after), 3)
            if config.close_on_answer:
                session.closed_at = session.answered_at
            session.result = self._bot_result(rng, message.variables)
            session.result_visible_at = max(session.answered_at, session.visible_at)
        message.session = session
        self.sessions.append(session)
        for _ in range(config.padding_sessions):
            self.sessions.append(self._padding_session(rng, session))

    def rewrite_result(self, session_id: str, result: dict, close: bool = False) -> None:
        """The bot changes its recorded answer (the dialog went on, or an operator edited it)."""
        with self.lock:
            session = next(s for s in self.sessions if s.id == session_id)
            session.result = dict(result)
            session.answered_at = session.answered_at or now_ms()
            session.result_visible_at = max(now_ms(), session.visible_at)
            if close:
                session.closed_at = now_ms()

    def _bot_result(self, rng: random.Random, variables: dict) -> dict:
        """Shaped like the recipe's example: every value a string, and no variables written `[]`
        (TWIN's PHP side encodes an empty map as a JSON array)."""
        confirmation = rng.choice(self.config.result_confirmations)
        nps = str(rng.randint(1, 10))
        return {"nps": nps, "confirmation": confirmation, "initialVariables": dict(variables) or []}

    def _padding_session(self, rng: random.Random, real: Session) -> Session:
        """Someone else's chat in the same window; half on the same channel, half elsewhere."""
        started = round(real.started_at - rng.uniform(0.0, 0.5), 3)   # already visible
        session = Session(id=seeded_uuid(rng), name=f"other chat {rng.randint(1, 999)}",
                          client_id=seeded_uuid(rng), messenger_type=real.messenger_type,
                          chat_id=real.chat_id if rng.random() < 0.5 else seeded_uuid(rng),
                          started_at=started, closed_at=started + self.config.session_close_after,
                          visible_at=started + self.config.stats_lag)
        if rng.random() < 0.7:    # results that look like ours, to punish picking by position
            session.answered_at = round(started + rng.uniform(*self.config.result_after), 3)
            session.closed_at = session.answered_at
            session.result = self._bot_result(rng, {"name": "someone else"})
        return session
