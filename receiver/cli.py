"""Operator commands, run as `flask --app receiver <command>`."""
from __future__ import annotations

import logging
import os
import sys

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from . import callbacks, destinations, models, redaction, results, sending, summaries
from . import rejected as kept
from .auth import secrets_of
from .check_twin import run as run_check_twin
from .forwarding import stats
from .forwards_cli import counts_line, forwards
from .health import backlog
from .maintenance import MaintenanceError
from .maintenance import backup as run_backup
from .maintenance import prune as run_prune
from .settings import masked_url
from .worker import Worker


def register(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)


@click.command("init-db")
def init_db():
    """Create the tables and the results view (create_app already does; this says so)."""
    models.create_schema()
    click.echo(f"database ready: {masked_url(current_app.config['SETTINGS'].database_url)}")


@click.command("show-urls")
def show_urls():
    """Print the callback URL to give TWIN (it holds the callback token: keep it private)."""
    click.echo(current_app.config["SETTINGS"].callback_url(current_app.config["CALLBACK_TOKEN"]))


@click.command("show-token")
def show_token():
    """Print the API token and the callback URL (both secrets: for your own terminal only)."""
    config = current_app.config
    click.echo(f"API token (Authorization: Bearer ...): {config['API_TOKEN']}")
    url = config["SETTINGS"].callback_url(config["CALLBACK_TOKEN"])
    click.echo(f"callback URL (callbackUrl of TWIN sends): {url}")
    click.echo("sending over HTTP (POST /api/sends): " + ("on, with SEND_TOKEN" if config["SEND_TOKEN"]
                                                          else "off (set SEND_TOKEN to turn it on)"))


@click.command("worker")
@click.option("--once", is_flag=True, help="Run one pass over what is due, then exit.")
def worker(once: bool):
    """Run the worker: send mailings queued by POST /api/sends, and find chat sessions and bot
    results for delivered messages."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redaction.install(secrets_of(current_app))        # the handler basicConfig just added redacts too
    if not current_app.config["SETTINGS"].has_twin24_credentials:
        # Stay up rather than exit: a supervisor would only restart us into the same state.
        click.echo("worker: no TWIN credentials (set TWIN24_TOKEN, or TWIN24_LOGIN and TWIN24_PASSWORD); "
                   "callbacks are still recorded (old events pruned, the results' summaries kept), but nothing "
                   "is sent or looked up until then", err=True)
    Worker.from_app(current_app).run(once=once)


@click.command("check-twin")
@with_appcontext
def check_twin():
    """Try the TWIN settings once: log in (or take TWIN24_TOKEN), refresh, ask both statistics for the
    last hour; print each call, TWIN's status, the time and the answer's keys, then a verdict. Sends
    nothing; exits 1 when a step fails, 2 without credentials."""
    raise SystemExit(run_check_twin(current_app.config["SETTINGS"], click.echo))


@click.command("status")
def status():
    """Print the enrichment backlog: messages per stage, the oldest due one, the last TWIN errors."""
    report = backlog()
    click.echo("messages by stage:")
    for stage in models.STAGES:
        click.echo(f"  {stage:<9} {report['stages'].get(stage, 0)}")
    click.echo(f"due now: {report['due']}")
    oldest = report["oldest_due_seconds"]
    click.echo(f"oldest due: {'-' if oldest is None else f'{oldest:.0f} s overdue'}")
    if not report["twin_errors"]:
        click.echo("last TWIN error: none")
    for endpoint, (error, at) in report["twin_errors"].items():
        click.echo(f"last TWIN error ({endpoint}, {at:%Y-%m-%d %H:%M:%S} UTC): {error}")
    _forwarding_status()


def _forwarding_status() -> None:
    """The webhooks' lines of `status`: per subscription, its counts and the oldest pending age."""
    rows = stats()
    click.echo("webhooks:" + (" none (docs/forwarding.md)" if not rows else ""))
    for row in rows:
        click.echo(f"  #{row['id']} {masked_url(row['url'])}: {counts_line(row)}")


@click.command("send")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Chat settings and send options from a JSON, TOML or INI file (chatId, botId, "
                   "messengerType, chatSessionName, text, provider, callbackData, variables, and the "
                   "options below by their TWIN names). Options win over it.")
@click.option("--chat-id", help="channels.chat.chatId: the chat channel to send from.")
@click.option("--bot-id", help="channels.chat.botId.")
@click.option("--messenger-type", help="channels.chat.messengerType (default WHATSAPP).")
@click.option("--chat-session-name", help="channels.chat.chatSessionName.")
@click.option("--text", help="channels.chat.text: the first message.")
@click.option("--provider", help="channels.chat.provider (default TWIN).")
@click.option("--callback-data", help="callbackData: names the mailing in every callback.")
@click.option("--variables", "declared", help="Comma-separated variable names: any other column is an error.")
@click.option("--send-at", help="sendAt: send later, at this ISO 8601 time with a zone offset "
                                "(2025-03-01T10:00:00+03:00).")
@click.option("--allowed-time-ranges", help="allowedTimeRanges: when TWIN may deliver, e.g. "
                                            "'09:00:00-13:00:00,14:00:00-18:00:00'.")
@click.option("--validity-period", type=int, help="channels.chat.validityPeriod: minutes (1-2880) before an "
                                                  "undelivered message ends EXPIRED.")
@click.option("--template-id", help="templateId.")
@click.option("--use-short-links/--no-use-short-links", default=None, help="useShortLinks.")
@click.option("--continue-last-or-start-new-session/--no-continue-last-or-start-new-session", "continue_session",
              default=None, help="channels.chat.continueLastOrStartNewSession.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), help="Default: from the file's extension.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Destinations per request (SEND_BATCH_SIZE).")
@click.option("--dry-run", is_flag=True, help="Check the input and show what would be sent; send nothing.")
@click.option("--resend-unknown", is_flag=True,
              help="Also send rows whose earlier send has an unknown outcome. TWIN may have taken them: "
                   "their recipients may get the message twice.")
def send(file, config_path, chat_id, bot_id, messenger_type, chat_session_name, text, provider,
         callback_data, declared, send_at, allowed_time_ranges, validity_period, template_id, use_short_links,
         continue_session, fmt, batch_size, dry_run, resend_unknown):
    """Send a mailing from a CSV or JSON FILE, with callbackUrl set to this receiver.

    Everything is checked before the first request; a rerun of the same mailing (same chat settings and
    callbackData) sends only the rows that did not go out. See docs/sending.md.
    """

    settings = current_app.config["SETTINGS"]
    options = {"chatId": chat_id, "botId": bot_id, "messengerType": messenger_type,
               "chatSessionName": chat_session_name, "text": text, "provider": provider,
               "callbackData": callback_data, "variables": declared, "sendAt": send_at,
               "allowedTimeRanges": allowed_time_ranges, "validityPeriod": validity_period,
               "templateId": template_id, "useShortLinks": use_short_links,
               "continueLastOrStartNewSession": continue_session}
    url = settings.callback_url(current_app.config["CALLBACK_TOKEN"])
    chat, rows = _checked_input(file, config_path, options, fmt, url)
    if not settings.has_twin24_credentials and not dry_run:
        click.echo("nothing was sent: set TWIN24_TOKEN, or TWIN24_LOGIN and TWIN24_PASSWORD", err=True)
        raise SystemExit(2)
    sender = sending.Sender(settings, chat, callback_url=url, batch_size=batch_size,
                            resend_unknown=resend_unknown, source=str(file))
    plan = sender.plan(rows)
    if dry_run:
        for line in sending.summary_lines(plan):
            click.echo(line)
        return
    report = _run_with_progress(sender, plan, rows, resend_unknown)
    for line in sending.summary_lines(report):
        click.echo(line)
    if not report.complete:
        raise SystemExit(1)


def _checked_input(file, config_path, options: dict, fmt, url: str):
    """(chat settings, destinations) of `flask send`, the options winning over the --config file, and
    TWIN's limit on the callback URL checked before any call: or every problem printed, and exit 2."""
    problems = destinations.callback_url_problems(url)
    try:
        values = destinations.load_config(config_path) if config_path else {}
        values.update({k: v for k, v in options.items() if v is not None})
        chat = destinations.chat_settings(values)
        rows = destinations.read_destinations(file, chat.variables, fmt)
    except destinations.InputError as error:
        problems = error.problems + problems
    if problems:
        click.echo(f"{file}: nothing was sent:\n{destinations.InputError(problems)}", err=True)
        raise SystemExit(2)
    return chat, rows


def _run_with_progress(sender: sending.Sender, plan: sending.SendReport, rows, resend_unknown: bool):
    """Send the rows with a progress bar on stderr (warning first when rows of unknown outcome go again);
    exit 1 when another run is sending this mailing."""
    work = len(sender.sendable(plan.rows))
    unknown = plan.by_state(sending.UNKNOWN)
    if unknown and resend_unknown:
        click.echo(f"warning: resending {len(unknown)} rows whose earlier send has an unknown outcome; "
                   "TWIN may have taken them, so these recipients may get the message twice", err=True)
    try:
        with click.progressbar(length=work, label=f"sending {work} of {len(rows)}",
                               show_pos=True, file=sys.stderr) as bar:
            sender.progress = bar.update
            return sender.run(rows)
    except sending.SendInProgress as error:
        click.echo(f"nothing was sent: {error}", err=True)
        raise SystemExit(1) from None


@click.command("export")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "jsonl"]), default="csv", show_default=True,
              help="csv: one row per message, result.<key> columns; json: one array; jsonl: one object a line.")
@click.option("--output", "-o", default="-", show_default=True, help="File to write, or - for standard output.")
@click.option("--callback-data", help="Only this callbackData (exact).")
@click.option("--bulk-id", help="Only this bulkId (exact).")
@click.option("--status", multiple=True, help="Only these current statuses (repeat, or A,B).")
@click.option("--stage", multiple=True, help="Only these enrichment stages (repeat, or a,b).")
@click.option("--since", help="first_seen_at at or after this ISO 8601 date/time (UTC unless an offset is given).")
@click.option("--until", help="first_seen_at before this ISO 8601 date/time.")
@click.option("--excel", is_flag=True, help="CSV for Excel: start with a byte order mark.")
@click.option("--raw", is_flag=True, help="CSV cells as stored: formulas not defused (for programs, not "
                                          "spreadsheets).")
def export(fmt, output, callback_data, bulk_id, status, stage, since, until, excel, raw):
    """Write the results (the `results` view, result fields flattened for CSV), streamed.

    CSV cells a spreadsheet would run as formulas (=, +, -, @ ...) get a leading ' unless --raw.
    A progress bar goes to standard error (on a terminal), and a last line with the rows written."""

    try:
        filters = results.Filters.build(callback_data=callback_data, bulk_id=bulk_id, status=status,
                                        stage=stage, since=since, until=until)
    except results.FilterError as error:
        raise click.BadParameter(error.detail, param_hint=f"--{error.param.replace('_', '-')}") from None
    total = export_total(filters)
    with click.progressbar(length=total, label=f"exporting {total} rows", show_pos=True, file=sys.stderr) as bar:
        if fmt == "csv":
            pieces = results.csv_stream(filters, excel=excel, raw=raw, keys=summaries.result_keys(filters),
                                        on_rows=bar.update)
        else:
            pieces = (results.json_stream if fmt == "json" else results.jsonl_stream)(filters, on_rows=bar.update)
        written = write_export(pieces, output)
    click.echo(f"wrote {bar.pos} rows to {written}", err=True)


def export_total(filters) -> int:
    """The rows an export will write, for its progress bar: the stored summaries' count when they
    cover the filters (rows stored since their last round make the bar end a little past 100%)."""
    stored = summaries.stored_tally(filters)
    if stored is not None:
        return stored[0].sent
    return filters.where(results.Message.select()).count()


def write_export(pieces, output: str) -> str:
    """Write the pieces to `output` (- for standard output); what was written, for the last line.

    A file is written beside the target and renamed at the end: a failed export never leaves half a
    file. On standard output a failure stops the command with an error and exit status 1, so a
    pipeline can tell a cut export from a whole one."""

    if output == "-":
        out = sys.stdout.buffer
        for piece in pieces:
            out.write(piece)
        out.flush()
        return "standard output"
    partial = f"{output}.part"
    try:
        with open(partial, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
        os.replace(partial, output)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return f"{output} ({os.path.getsize(output)} bytes)"


@click.command("backup")
@with_appcontext
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--keep", type=click.IntRange(min=0), default=0, show_default=True,
              help="When DEST is a directory: keep this many newest backups there, delete older ones (0 keeps all).")
def backup(dest: str, keep: int):
    """Copy the SQLite database to DEST (a file, or a directory for receiver-<time>.db), safely while the service runs."""
    try:
        written = run_backup(dest, keep=keep)
    except MaintenanceError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"backup written: {written} ({written.stat().st_size} bytes)")


@click.command("prune")
@with_appcontext
@click.option("--days", type=click.IntRange(min=1), default=None,
              help="Delete events older than this many days (default: EVENT_RETENTION_DAYS).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows deleted per transaction.")
def prune(days: int | None, dry_run: bool, batch_size: int):
    """Delete old events and refused callbacks (messages, their status and results stay)."""
    days = days or current_app.config["SETTINGS"].event_retention_days
    if not days:
        click.echo("retention is off (EVENT_RETENTION_DAYS=0 and no --days): nothing deleted")
        return
    try:
        result = run_prune(days, batch_size=batch_size, dry_run=dry_run)
    except MaintenanceError as error:
        raise click.ClickException(str(error)) from None
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {result.events} events and {result.rejected} refused callbacks "
               f"received before {result.cutoff:%Y-%m-%d %H:%M:%S} UTC ({days} days)")


@click.group("rejected")
def rejected():
    """Refused callbacks kept in the `rejected` table: list them by reason, replay them after a fix."""


@rejected.command("list")
@with_appcontext
@click.option("--reason", help="Show the kept refusals of this reason, one a line.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Rows shown with --reason.")
def rejected_list(reason: str | None, limit: int):
    """Refusals by reason: how many are kept, how many no replay has resolved, first and last time (UTC)."""
    if reason is None:
        counts = kept.by_reason()
        click.echo(f"{'reason':<24} {'kept':>6} {'unresolved':>10}  {'first (UTC)':<19}  last (UTC)"
                   if counts else "no refused callbacks are kept")
        for c in counts:
            click.echo(f"{c.reason:<24} {c.kept:>6} {c.unresolved:>10}  {c.first:%Y-%m-%d %H:%M:%S}  "
                       f"{c.last:%Y-%m-%d %H:%M:%S}")
        return
    rows = list(kept.select(reason=reason).limit(limit + 1))
    if not rows:
        click.echo(f"no refused callbacks are kept with reason {reason}")
    for row in rows[:limit]:
        replayed = (f"replayed {row.replayed_at:%Y-%m-%d %H:%M:%S}: {row.replay_outcome}" if row.replayed_at
                    else "not replayed")
        click.echo(f"#{row.id} {row.received_at:%Y-%m-%d %H:%M:%S} {row.reason} ({replayed}): {row.detail}")
        click.echo(f"    {kept.body_preview(row)}")
    if len(rows) > limit:
        click.echo(f"more than {limit} are kept: raise --limit")


@rejected.command("replay")
@with_appcontext
@click.option("--id", "row_id", type=int, help="Replay this one kept refusal (its #id in `rejected list`).")
@click.option("--reason", help="Replay the kept refusals of this reason.")
@click.option("--since", help="Refused at or after this ISO 8601 date/time (UTC unless an offset is given).")
@click.option("--until", help="Refused before this ISO 8601 date/time.")
def rejected_replay(row_id: int | None, reason: str | None, since: str | None, until: str | None):
    """Store kept refusals through the callback endpoint's own reader, as if they came now.

    Idempotent: a callback already stored is reported as a duplicate. Each row is marked with what
    came of it; exits 1 if the database could not store one.
    """
    if row_id is None and reason is None and since is None and until is None:
        raise click.UsageError("say what to replay: --id, --reason, or --since/--until")
    try:
        since_at = results.parse_time("since", since) if since else None
        until_at = results.parse_time("until", until) if until else None
    except results.FilterError as error:
        raise click.BadParameter(error.detail, param_hint=f"--{error.param}") from None
    ids = kept.replay_ids(kept.select(row_id=row_id, reason=reason, since=since_at, until=until_at))
    if row_id is not None and not ids:
        raise click.ClickException(f"no kept refusal #{row_id}")
    totals = dict.fromkeys(["stored", "duplicate", "still refused", "not replayable"], 0)
    for next_id in ids:
        try:
            replay = kept.replay(kept.select(row_id=next_id).get())
        except callbacks.Unstored as error:
            click.echo(f"#{next_id}: the database could not store message {error.message_id}: {error.__cause__}; "
                       "nothing marked, try again", err=True)
            raise SystemExit(1) from None
        for line, kind in _replay_lines(replay):
            click.echo(line)
            totals[kind] += 1
    click.echo(f"replayed {len(ids)} kept refusals: " + ", ".join(f"{n} {kind}" for kind, n in totals.items()))


def _replay_lines(replay):
    """(line, kind) per callback of a replayed row."""
    where = f"#{replay.row_id} ({replay.reason})"
    if replay.not_replayable:
        yield f"{where}: not replayable: {replay.not_replayable}", "not replayable"
        return
    if replay.refusal:
        yield f"{where}: still refused: {replay.refusal.reason}: {replay.refusal.detail}", "still refused"
        return
    for outcome in replay.outcomes:
        if outcome.refusal:
            yield f"{where}: still refused: {outcome.refusal.reason}: {outcome.refusal.detail}", "still refused"
        else:
            callback = outcome.callback
            yield f"{where}: {outcome.kind}: message {callback.message_id} {callback.new_status}", outcome.kind


# Every command, for app.cli and for `python -m receiver` (receiver/__main__.py).
COMMANDS = (init_db, show_urls, show_token, worker, status, send, export, backup, prune, check_twin, rejected,
            forwards)
