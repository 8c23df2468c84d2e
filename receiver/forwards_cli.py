"""`python -m receiver forwards ...`: the webhook subscriptions and their deliveries (docs/forwarding.md).

list (counts per subscription, --dead for the dead events), add, remove, retry (dead events pending
again) and replay (delivered events sent again, with the same event ids).
"""
from __future__ import annotations

import base64
import secrets
from urllib.parse import urlsplit

import click
from flask.cli import with_appcontext

from . import forwarding, results
from .db import utcnow, write_transaction
from .models import Delivery, DeliveryAttempt, Subscription
from .settings import _webhook_secret_ok


@click.group("forwards")
def forwards():
    """Webhooks: push each result to your URLs, signed (Standard Webhooks). See docs/forwarding.md."""


def new_secret() -> str:
    """A "whsec_<base64 of 24 random bytes>" secret, as the standardwebhooks library takes it."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def age_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{max(0.0, seconds):.0f} s"


def counts_line(row: dict) -> str:
    """One subscription's counts, as `forwards list` and `status` print them."""
    line = (f"pending {row['pending']}, delivered {row['delivered']}, dead {row['dead']}, "
            f"oldest pending {age_text(row['oldest_pending_seconds'])}")
    if row.get("paused_reason"):
        line += f"; {'disabled' if row.get('disabled') else 'paused'}: {row['paused_reason']}"
    return line


def _filter_text(subscription) -> str:
    parts = []
    if subscription.filter_callback_data is not None:
        parts.append(f"callbackData = {subscription.filter_callback_data!r}")
    if subscription.filter_callback_data_prefix is not None:
        parts.append(f"callbackData starts with {subscription.filter_callback_data_prefix!r}")
    if subscription.filter_bulk_id is not None:
        parts.append(f"bulkId = {subscription.filter_bulk_id!r}")
    return ", ".join(parts) or "none (every message)"


@forwards.command("list")
@with_appcontext
@click.option("--dead", is_flag=True, help="Also list the dead events, one a line.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Dead events shown.")
def forwards_list(dead: bool, limit: int):
    """Each subscription: its URL, events, filter, pending / delivered / dead, the oldest pending age."""
    rows = forwarding.stats()
    if not rows:
        click.echo("no subscriptions: set FORWARD_URL and FORWARD_SECRET, or run `forwards add URL`")
        return
    subscriptions = {s.id: s for s in Subscription.select()}
    for row in rows:
        subscription = subscriptions[row["id"]]
        origin = " (FORWARD_URL)" if subscription.from_settings else ""
        click.echo(f"#{row['id']} {subscription.url}{origin}")
        click.echo(f"    events: {', '.join(row['events'])}")
        click.echo(f"    filter: {_filter_text(subscription)}")
        click.echo(f"    {counts_line(row)}")
    if not dead:
        return
    found = list(Delivery.select().where(Delivery.state == forwarding.DEAD).order_by(Delivery.id).limit(limit + 1))
    click.echo(f"dead events: {'none' if not found else ''}".rstrip())
    for delivery in found[:limit]:
        last = f"HTTP {delivery.last_status}" if delivery.last_status is not None else "no answer"
        click.echo(f"  {delivery.event_id} #{delivery.subscription} {delivery.event_type} message "
                   f"{delivery.message_id} at {delivery.created_at:%Y-%m-%d %H:%M:%S} UTC: {delivery.attempts} "
                   f"attempts, last {last}" + (f" ({delivery.last_error})" if delivery.last_error else ""))
    if len(found) > limit:
        click.echo(f"more than {limit} are dead: raise --limit")


@forwards.command("add")
@with_appcontext
@click.argument("url")
@click.option("--secret", help="whsec_<base64>; without it one is generated and printed once.")
@click.option("--events", default="message.result,message.given_up", show_default=True,
              help="Comma list of message.result, message.status, message.given_up.")
@click.option("--callback-data", help="Only messages of this callbackData (exact).")
@click.option("--callback-data-prefix", help="Only messages whose callbackData starts with this.")
@click.option("--bulk-id", help="Only messages of this bulkId.")
def forwards_add(url, secret, events, callback_data, callback_data_prefix, bulk_id):
    """Push events to URL (another subscription beside FORWARD_URL's)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("an http:// or https:// URL", param_hint="URL")
    wanted = [e.strip() for e in events.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in forwarding.EVENT_TYPES]
    if unknown or not wanted:
        raise click.BadParameter(f"known events: {', '.join(forwarding.EVENT_TYPES)}", param_hint="--events")
    generated = secret is None
    secret = new_secret() if generated else secret
    if not _usable_secret(secret):
        raise click.BadParameter("whsec_ and the base64 of at least 24 random bytes (leave it out to have one "
                                "generated)", param_hint="--secret")
    with write_transaction():
        subscription = Subscription.create(url=url, secret=secret, events=",".join(wanted),
                                           filter_callback_data=callback_data,
                                           filter_callback_data_prefix=callback_data_prefix,
                                           filter_bulk_id=bulk_id, created_at=utcnow())
    forwarding.forget_wants()
    click.echo(f"subscription #{subscription.id}: {url} ({', '.join(wanted)})")
    if generated:
        click.echo(f"secret (shown this once: give it to the receiving system to verify signatures): {secret}")


def _usable_secret(secret: str) -> bool:
    """What FORWARD_SECRET must be too: whsec_ and the base64 of at least 24 bytes."""
    return secret.startswith("whsec_") and _webhook_secret_ok(secret)


@forwards.command("remove")
@with_appcontext
@click.argument("subscription_id", metavar="ID", type=int)
def forwards_remove(subscription_id: int):
    """Stop pushing to subscription ID and delete it with its events (FORWARD_URL's: unset it instead)."""
    subscription = Subscription.get_or_none(Subscription.id == subscription_id)
    if subscription is None:
        raise click.ClickException(f"no subscription #{subscription_id}")
    if subscription.from_settings:
        raise click.ClickException(f"#{subscription_id} is FORWARD_URL's: unset FORWARD_URL and restart the worker")
    with write_transaction():
        events = Delivery.select(Delivery.id).where(Delivery.subscription == subscription_id)
        DeliveryAttempt.delete().where(DeliveryAttempt.delivery.in_(events)).execute()
        deleted = Delivery.delete().where(Delivery.subscription == subscription_id).execute()
        subscription.delete_instance()
    forwarding.forget_wants()
    click.echo(f"removed subscription #{subscription_id} ({subscription.url}) and its {deleted} events")


def _range(since: str | None, until: str | None):
    try:
        return (results.parse_time("since", since) if since else None,
                results.parse_time("until", until) if until else None)
    except results.FilterError as error:
        raise click.BadParameter(error.detail, param_hint=f"--{error.param}") from None


def delivery_ids(event_ids) -> list[int]:
    """The deliveries of these event ids (evt_...); an unknown one is an error."""
    found = dict(Delivery.select(Delivery.event_id, Delivery.id).where(Delivery.event_id.in_(list(event_ids))).tuples())
    missing = [e for e in event_ids if e not in found]
    if missing:
        raise click.ClickException(f"no event {missing[0]}")
    return [found[e] for e in event_ids]


@forwards.command("retry")
@with_appcontext
@click.option("--id", "event_ids", multiple=True, help="This dead event (its evt_... id; repeat for several).")
@click.option("--subscription", type=int, help="The dead events of this subscription.")
@click.option("--since", help="Events created at or after this ISO 8601 date/time (UTC unless an offset is given).")
@click.option("--until", help="Events created before this ISO 8601 date/time.")
@click.option("--all", "everything", is_flag=True, help="Every dead event.")
def forwards_retry(event_ids, subscription, since, until, everything):
    """Dead events back to pending: delivered again, with their event ids, from a fresh FORWARD_MAX_AGE."""
    if not (event_ids or subscription or since or until or everything):
        raise click.UsageError("say what to retry: --id, --subscription, --since/--until, or --all")
    since_at, until_at = _range(since, until)
    count = forwarding.retry_dead(ids=delivery_ids(event_ids) if event_ids else None, subscription=subscription,
                                  since=since_at, until=until_at)
    click.echo(f"{count} dead events are pending again")


@forwards.command("replay")
@with_appcontext
@click.option("--subscription", type=int, help="The delivered events of this subscription.")
@click.option("--since", help="Events created at or after this ISO 8601 date/time (UTC unless an offset is given).")
@click.option("--until", help="Events created before this ISO 8601 date/time.")
@click.option("--message", "message_ids", multiple=True, help="The events of this message id (repeat for several).")
def forwards_replay(subscription, since, until, message_ids):
    """Delivered events sent again, each with its own event id (a target that deduplicates sees it once)."""
    if not (subscription or since or until or message_ids):
        raise click.UsageError("say what to replay: --subscription, --since/--until, or --message")
    since_at, until_at = _range(since, until)
    count = forwarding.replay(subscription=subscription, since=since_at, until=until_at,
                              message_ids=list(message_ids) or None)
    click.echo(f"{count} delivered events are pending again")
