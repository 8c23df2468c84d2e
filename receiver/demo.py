"""The whole recipe in one command, on this machine, with nothing configured:  make demo

1. starts a TWIN simulator (receiver/simulator) with some of real TWIN's habits switched on:
   duplicate and out-of-order callbacks, statistics that lag, other people's chat sessions mixed in;
2. starts the receiver as it runs in production: gunicorn with deploy/gunicorn.conf.py and the
   enrichment worker, on a fresh SQLite file;
3. sends a small mailing through the receiver (`python -m receiver send`), so callbackUrl is the
   receiver's own;
4. shows the results arriving, and ends with the recipe's table (messageId, chatId, result) read
   from the receiver's own SQLite file.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from .simulator import SimConfig, Simulator
from .status import FAILED_STATUSES

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
NAMES = ["Иван", "Мария", "Пётр", "Анна", "Олег", "Елена", "Сергей", "Ольга", "Денис", "Юлия", "Артём",
         "Наталья"]


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="twin24-demo-"))
    twin = Simulator(SimConfig(
        seed=42, pending_after=(0.2, 1.0), final_after=(0.5, 2.5), undelivered_rate=0.1, expired_rate=0.1,
        stats_lag=1.0, result_after=(2.0, 8.0), no_reply_rate=0.2, session_close_after=12.0,
        duplicate_callbacks=0.3, reorder_callbacks=0.3, padding_sessions=2, shuffle=True,
    )).start()
    port = free_port()
    env = demo_env(twin, workdir, port)
    processes: list[subprocess.Popen] = []
    say(f"TWIN simulator on {twin.url}; receiver on http://127.0.0.1:{port}; files in {workdir}")
    try:
        processes.append(start_process(["gunicorn", "-c", str(GUNICORN_CONF), "wsgi:app"], env,
                                       workdir / "web.log"))
        wait_healthy(f"http://127.0.0.1:{port}/healthz")
        processes.append(start_process(["python", "-m", "receiver", "worker"], env, workdir / "worker.log"))
        say("checking the TWIN account first, as a new user would: python -m receiver check-twin")
        subprocess.run([sys.executable, "-m", "receiver", "check-twin"], cwd=workdir, env=with_code(env), check=True)

        csv_path = workdir / "mailing.csv"
        csv_path.write_text("phone,name\n" + "".join(
            f"+7 999 {100 + n:03d}-{n:02d}-{n:02d},{name}\n" for n, name in enumerate(NAMES)), encoding="utf-8")
        say(f"sending {len(NAMES)} messages through the receiver: python -m receiver send {csv_path.name} ...")
        subprocess.run([sys.executable, "-m", "receiver", "send", str(csv_path), "--chat-id", "demo-channel",
                        "--bot-id", "demo-bot", "--chat-session-name", "Опрос", "--callback-data", "demo",
                        "--text", "Здравствуйте, {{name}}! Придёте на встречу?"],
                       cwd=workdir, env=with_code(env), check=True)
        database = workdir / "receiver.db"
        settled = watch(database, len(NAMES), timeout=45)
        print_table(database)
        if not settled:
            say("not everything settled within 45 s (see the logs in the folder above)")
            return 1
        wrong = check_against_truth(database, twin.truth())
        if wrong:
            say(f"these messages differ from the simulator's ground truth: {', '.join(wrong)}")
            return 1
    finally:
        stop_processes(processes)
        twin.stop()
    say(f"read it yourself: sqlite3 {workdir}/receiver.db 'select * from results'")
    return 0


def demo_env(twin: Simulator, workdir: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWIN24_", "ENRICH_", "DATABASE_", "CALLBACK_", "API_", "PUBLIC_"))}
    env.update({
        "DATABASE_URL": f"sqlite:///{workdir}/receiver.db", "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": "demo-callback-token-" + os.urandom(8).hex(),
        "API_TOKEN": "demo-api-token-" + os.urandom(8).hex(),
        "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_WORKERS": "2", "GUNICORN_ACCESS_LOG": "",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        "TWIN24_LOGIN": twin.login, "TWIN24_PASSWORD": twin.password, "TWIN24_AUTH_URL": twin.auth_url,
        "TWIN24_NOTIFY_URL": twin.notify_url, "TWIN24_ANALYSE_URL": twin.analyse_url,
        # Demo timings: look early and often (production defaults are in seconds to minutes).
        "ENRICH_FIRST_CHECK": "0.5", "ENRICH_SWEEP_INTERVAL": "1", "ENRICH_BACKOFF_START": "1",
        "ENRICH_BACKOFF_MAX": "2", "ENRICH_POLL_INTERVAL": "0.2", "ENRICH_RESULT_HORIZON": "30",
    })
    (workdir / "metrics").mkdir()
    return env


def watch(database: Path, count: int, timeout: float) -> bool:
    """Print one line a second with what has arrived; True once every message is settled."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with sqlite3.connect(database, timeout=30) as connection:
            row = connection.execute("""
                select count(*),
                       sum(status = 'DELIVERED'),
                       sum(chat_id is not null),
                       sum(result is not null),
                       sum(stage in ('done', 'given_up') or status in ({failed}))
                from results""".format(failed=", ".join(f"'{status}'" for status in FAILED_STATUSES))).fetchone()
        total, delivered, chats, answered, settled = (value or 0 for value in row)
        line = f"  messages {total:>2}  delivered {delivered:>2}  chat ids {chats:>2}  results {answered:>2}"
        if line != last:
            say(line)
            last = line
        if total >= count and settled >= count:
            return True
        time.sleep(1.0)
    return False


def print_table(database: Path) -> None:
    with sqlite3.connect(database, timeout=30) as connection:
        rows = connection.execute(
            "select message_id, phone, status, chat_id, result, given_up_reason from results "
            "order by destination_index").fetchall()
    print()
    print(f"{'messageId':<36}  {'phone':<12}  {'chatId':<36}  result")
    print(f"{'-' * 36}  {'-' * 12}  {'-' * 36}  {'-' * 24}")
    for message_id, phone, status, chat_id, result, given_up in rows:
        if result:
            shown = json.loads(result).get("confirmation", result)
        elif status != "DELIVERED":
            shown = f"({status.lower()})"
        else:
            shown = f"({given_up})" if given_up else "(waiting)"
        print(f"{message_id:<36}  {phone or '':<12}  {chat_id or '':<36}  {shown}")
    print()


def check_against_truth(database: Path, truth: list[dict]) -> list[str]:
    """The ids of messages whose stored chat id or result is not what the simulator knows."""
    with sqlite3.connect(database, timeout=30) as connection:
        stored = {row[0]: row[1:] for row in connection.execute("select message_id, chat_id, result from results")}
    answered = [t for t in truth if t["finalStatus"] == "DELIVERED" and t["result"] is not None]
    wrong = [t["id"] for t in answered
             if t["id"] not in stored or stored[t["id"]][0] != t["sessionId"]
             or json.loads(stored[t["id"]][1] or "null") != t["result"]]
    if not wrong:
        say(f"checked against the simulator's ground truth: all {len(answered)} delivered and answered "
            f"messages are in the table with the right chatId and result")
    return wrong


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


# -- process helpers, shared with bench/ ----------------------------------------------------------

def start_process(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """Start gunicorn (from the virtualenv) or `python ...` with its output in log_path, in log_path's
    folder: the settings are `env`'s alone, not those of a .env the developer keeps in the checkout."""
    executable = str(Path(sys.executable).with_name(command[0])) if command[0] != "python" else sys.executable
    return subprocess.Popen([executable, *command[1:]], cwd=log_path.parent, env=with_code(env),
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def with_code(env: dict) -> dict:
    """`env` with this checkout on PYTHONPATH, for a process that runs outside it."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM to all (they stop together), then SIGKILL to any still running after `timeout`."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered {url} within {timeout} s")


if __name__ == "__main__":
    sys.exit(main())
