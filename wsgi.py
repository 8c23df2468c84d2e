"""The WSGI entry point: `gunicorn wsgi:app`."""
import sys

from receiver import SettingsError, create_app
from receiver.settings import EXIT_BAD_SETTING_GUNICORN

try:
    app = create_app()
except SettingsError as error:
    # gunicorn boots a new worker after one that exits with 1, forever; a worker that exits with 3
    # ("failed to boot") makes the master stop, so a bad setting stops the service at once.
    print(f"twin24-receiver: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_SETTING_GUNICORN)
