"""Gunicorn settings for twin24-receiver:  gunicorn -c deploy/gunicorn.conf.py wsgi:app

Every value can be changed from the environment (systemd EnvironmentFile, compose env_file), so
this file is the same on every machine:

    GUNICORN_BIND           where to listen (default 127.0.0.1:8000; nginx proxies to it)
    GUNICORN_WORKERS        worker processes (default: see _default_workers below)
    GUNICORN_WORKER_CLASS   sync (default) or gthread
    GUNICORN_THREADS        threads per worker when the class is gthread (default 4)
    GUNICORN_TIMEOUT        seconds a request may take before its worker is killed (default 30)
    GUNICORN_ACCESS_LOG     access log file, "-" for stdout (default), "" to switch it off
    GUNICORN_LOG_LEVEL      error log level (default info)
    PROMETHEUS_MULTIPROC_DIR  where worker processes keep their metric counts (see below)

The access and error logs never show the callback token, the Authorization header or secret query
values: RedactingLogger below replaces them with ***.

Nothing here imports the application: the master process stays free of it, so that a SIGHUP
(systemctl reload) makes new workers load the new code (see preload_app).
"""
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

from gunicorn.glogging import Logger


def _env_int(name, default):
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _default_workers():
    """2 x CPU + 1, the usual figure for a sync worker; on SQLite one per CPU, 2 to 4.

    SQLite has a single writer: every callback is one short write transaction, and each process
    that writes makes the others reread what it changed, so beyond one process per CPU they only
    cost (see deploy/README.md, "Sizing", for the figures). PostgreSQL takes the full count.
    """
    cpus = os.cpu_count() or 1
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith(("postgres", "postgresql")):
        return max(2 * cpus + 1, 2)
    return min(max(cpus, 2), 4)


bind = [address.strip() for address in os.environ.get("GUNICORN_BIND", "127.0.0.1:8000").split(",")
        if address.strip()]
workers = _env_int("GUNICORN_WORKERS", _default_workers())
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync").strip() or "sync"
threads = _env_int("GUNICORN_THREADS", 4 if worker_class == "gthread" else 1)

# A callback is answered in milliseconds; 30 s is a wedged worker (a database that stopped
# answering), which the master then replaces. graceful_timeout: on SIGTERM or SIGHUP, a worker gets
# this long to finish the requests it has before it is killed.
timeout = _env_int("GUNICORN_TIMEOUT", 30)
graceful_timeout = _env_int("GUNICORN_GRACEFUL_TIMEOUT", 30)
# nginx keeps upstream connections open (keepalive in deploy/nginx); close idle ones after 5 s.
keepalive = _env_int("GUNICORN_KEEPALIVE", 5)

# Every worker imports and builds the app itself, after the fork:
# - each process opens its own database connections (a SQLite handle or a psycopg2 connection
#   opened before fork() must not be shared between processes);
# - SIGHUP (systemctl reload) then loads new code: the master starts new workers with the
#   new code and retires the old ones gracefully; with preload_app the code would stay the old one.
# The price is a few hundred milliseconds more per worker start, which is nothing here.
preload_app = False

# Bodies are capped by the app (MAX_BODY_BYTES) and by nginx; these bound the request head.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# Client addresses and the scheme come from werkzeug's ProxyFix, configured with TRUSTED_PROXIES
# (receiver/__init__.py): one rule in one place. Gunicorn's own X-Forwarded-Proto handling is off.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "")

accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
errorlog = os.environ.get("GUNICORN_ERROR_LOG", "-")
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# Remote address, time, request line (token redacted), status, bytes, duration in ms, user agent.
# The Authorization header is never part of it.
access_log_format = '%(h)s - - %(t)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
proc_name = "twin24-receiver"
# gunicorn's control socket (gunicornc) defaults to ~/.gunicorn, which the hardened unit cannot write
# and which two instances on one host would share; systemctl reload (SIGHUP) needs none of it.
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]


# --- Logs without secrets -------------------------------------------------------------------------
# The callback token is part of the URL (/callbacks/<CALLBACK_TOKEN>): a plain access log would write
# it to disk on every callback, and gunicorn's "Error handling request <uri>" would too. The redaction
# is the app's own (receiver/redaction.py), loaded here from its file: importing it as
# receiver.redaction would import the whole application into this master (see preload_app).


def _load_redaction():
    spec = importlib.util.find_spec("receiver")     # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gunicorn.conf.py: the receiver package is not importable from here")
    path = os.path.join(spec.submodule_search_locations[0], "redaction.py")
    module_spec = importlib.util.spec_from_file_location("_twin24_receiver_redaction", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


_redaction = _load_redaction()
REDACTED = _redaction.REDACTED
RedactFilter = _redaction.RedactFilter
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")


def redact(text):
    """`text` with callback tokens and secret query values replaced by ***."""
    return _redaction.redact(text)


_FILTER = RedactFilter()


def _add_filter(target):
    if not any(isinstance(f, RedactFilter) for f in target.filters):
        target.addFilter(_FILTER)


class RedactingLogger(Logger):
    """gunicorn's Logger, minus the secrets."""

    def setup(self, cfg):
        super().setup(cfg)
        # Filters on the loggers cover every record they create; on the handlers, anything that
        # reaches them from elsewhere. setup() runs again on SIGHUP, with new handlers.
        for log in (self.error_log, self.access_log):
            _add_filter(log)
            for handler in log.handlers:
                _add_filter(handler)

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        for name in SECRET_HEADERS:
            for key in (f"{{{name}}}i", "{{http_{}}}e".format(name.replace("-", "_"))):
                if key in atoms:
                    atoms[key] = REDACTED
        for key, value in atoms.items():
            atoms[key] = redact(value)
        atoms["u"] = "-"    # the Basic-auth user gunicorn decodes from Authorization: not logged
        return atoms


logger_class = RedactingLogger

# Prometheus: each worker process keeps its counts in files in PROMETHEUS_MULTIPROC_DIR, and /metrics
# adds them up. Without the variable, a per-user directory is used so that several workers report
# correct totals out of the box. The enrichment worker (`flask --app receiver worker`) must get the
# same value to have its counts in /metrics: the systemd units and compose.yaml set it for both.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(
        tempfile.gettempdir(), f"twin24-receiver-metrics-{os.getuid()}")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], mode=0o700, exist_ok=True)

_METRIC_FILE = re.compile(r"_(\d+)\.db$")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def on_starting(server):
    _stop_on_a_bad_setting()
    _forget_dead_processes_metrics(server)


def _stop_on_a_bad_setting():
    """Read the settings once before any worker starts, and stop with their one-line error.

    Each worker would find the same error and exit with "failed to boot" (wsgi.py), but several
    workers failing at once can make gunicorn's own shutdown fail with a traceback. The check runs in
    a child process, so that this master never imports the application (see preload_app).
    """
    found = subprocess.run([sys.executable, "-c", _SETTINGS_CHECK], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))})
    if found.returncode == _BAD_SETTING:
        print(found.stderr.strip(), file=sys.stderr, flush=True)
        sys.exit(_BAD_SETTING)
    # Anything else (the code cannot be imported from here): the workers will say what it is.


_BAD_SETTING = 3        # gunicorn's own status for "worker failed to boot"; the systemd unit expects it
_SETTINGS_CHECK = """
import sys
from receiver.settings import Settings, SettingsError
try:
    Settings.from_env()
except SettingsError as error:
    print(f"twin24-receiver: {error}", file=sys.stderr)
    sys.exit(3)
"""


def _forget_dead_processes_metrics(server):
    """Start the counts afresh: remove the files of processes that are gone.

    Files of live processes stay: the enrichment worker shares the directory and keeps running when
    the web service restarts, and deleting its open files would hide its counts until it restarts.
    """
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for path in glob.glob(os.path.join(directory, "*.db")):
        match = _METRIC_FILE.search(path)
        if match and _alive(int(match.group(1))) and int(match.group(1)) != os.getpid():
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    server.log.info("prometheus multiprocess directory: %s", directory)


def post_worker_init(worker):
    _give_the_app_the_heartbeat(worker)
    # The app's own loggers (Flask's "Exception on /callbacks/<token>" names the path) get the
    # same redaction as gunicorn's; create_app gave its filter the token values too. The app is
    # loaded in this worker already, so importing from it costs nothing here.
    from flask.logging import default_handler

    from receiver import redaction
    redaction.install(loggers=("receiver", "werkzeug", ""), handlers=[default_handler])


def _give_the_app_the_heartbeat(worker):
    """Let a long CSV export tell the master it is alive.

    A sync worker proves it is alive by touching its heartbeat file (worker.notify) between requests;
    the master kills one whose file is older than `timeout` ("WORKER TIMEOUT"), which would cut an
    export mid-file. The app calls HEARTBEAT while the export makes progress, so only a worker that
    stops making progress (a database that stopped answering) is killed.
    """
    config = getattr(worker.wsgi, "config", None)      # worker.wsgi is wsgi:app, the Flask app
    if config is not None:
        config["HEARTBEAT"] = worker.notify


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
