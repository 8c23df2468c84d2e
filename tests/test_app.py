"""The app factory: schema from the first start, and the tokens it makes when none are set."""
import sqlite3

from receiver import create_app

from .support import make_settings


def test_an_unset_callback_token_is_generated_once_kept_and_announced_once(tmp_path, capsys):
    settings = make_settings(f"sqlite:///{tmp_path}/r.db", callback_token=None, api_token=None)

    first = create_app(settings)
    printed_first = capsys.readouterr().err
    second = create_app(settings)
    printed_second = capsys.readouterr().err

    token = first.config["CALLBACK_TOKEN"]
    assert len(token) >= 40 and second.config["CALLBACK_TOKEN"] == token
    # stderr is no terminal here (a service's is a log): the tokens themselves are not printed.
    assert "generated CALLBACK_TOKEN" in printed_first and "generated API_TOKEN" in printed_first
    assert "python -m receiver show-token" in printed_first
    assert token not in printed_first and first.config["API_TOKEN"] not in printed_first
    assert printed_second == ""
    assert first.config["API_TOKEN"] != token


def test_the_schema_and_results_view_exist_from_the_first_start(tmp_path):
    create_app(make_settings(f"sqlite:///{tmp_path}/r.db"))

    with sqlite3.connect(tmp_path / "r.db") as connection:
        names = {row[0] for row in connection.execute("select name from sqlite_master")}
        columns = [c[1] for c in connection.execute("pragma table_info(results)")]
        journal = connection.execute("pragma journal_mode").fetchone()[0]

    assert {"message", "event", "rejected", "results"} <= names
    assert columns[:6] == ["message_id", "callback_data", "phone", "status", "chat_id", "result"]
    assert journal == "wal"


def test_a_database_from_an_earlier_version_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    from .support import callback_body

    settings = make_settings(f"sqlite:///{tmp_path}/r.db")
    app = create_app(settings)
    app.test_client().post("/callbacks/test-callback-token-0123456789", json=callback_body())
    with sqlite3.connect(tmp_path / "r.db") as connection:
        connection.execute("alter table message drop column session_started_at")

    create_app(settings)

    with sqlite3.connect(tmp_path / "r.db") as connection:
        columns = {c[1] for c in connection.execute("pragma table_info(message)")}
        rows = connection.execute("select id, status from message").fetchall()
    assert "session_started_at" in columns
    assert rows == [("m-1", "PENDING")]


def test_the_json_face_answers_an_unknown_path_or_method_in_json_and_the_pages_in_html(tmp_path):
    client = create_app(make_settings(f"sqlite:///{tmp_path}/receiver.db")).test_client()

    unknown = client.get("/api/nothing")
    assert unknown.status_code == 404
    assert unknown.json == {"error": "not_found", "detail": "nothing here: /api/nothing"}

    wrong_method = client.delete("/api/sends")
    assert wrong_method.status_code == 405 and wrong_method.headers["Allow"] == "OPTIONS, POST"
    assert wrong_method.json == {"error": "method_not_allowed", "detail": "use POST, not DELETE"}

    assert client.get("/callbacks/a/b").json["error"] == "not_found"
    page = client.get("/nothing")
    assert page.status_code == 404 and page.mimetype == "text/html"
