"""Operator commands, run as the operator runs them: `python -m receiver <command>`."""
from pathlib import Path

from receiver.enrich import Enricher
from receiver.twin24 import TwinClient

from .support import run_command

ROOT = Path(__file__).resolve().parent.parent


def test_status_shows_the_backlog_the_oldest_due_and_the_last_twin_error(settings, app, client, callback_path):
    for n in range(3):
        client.post(callback_path, json={"id": f"m-{n}", "oldStatus": "PENDING", "newStatus": "DELIVERED"})
    client.post(callback_path, json={"id": "m-9", "oldStatus": "CREATED", "newStatus": "PENDING"})
    # TWIN cannot be reached: the sweep fails and says so.
    unreachable = settings.__class__(**{**settings.__dict__, "twin24_token": "t" * 20,
                                        "twin24_analyse_url": "http://127.0.0.1:9", "twin24_retries": 0})
    Enricher(unreachable, TwinClient(unreachable)).run_once(force=True)

    run = run_command(settings, "status")

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "  chat_id   3" in lines and "  none      1" in lines
    assert "due now: 3" in lines
    assert any(line.startswith("oldest due: ") and line.endswith(" s overdue") for line in lines)
    assert any(line.startswith("last TWIN error (messages_stats, ") for line in lines), run.stdout


def test_show_urls_prints_the_callback_url(settings):
    run = run_command(settings, "show-urls")

    assert run.stdout.strip() == "http://127.0.0.1:8000/callbacks/test-callback-token-0123456789"
