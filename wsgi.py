"""The WSGI entry point: `gunicorn wsgi:app`."""
import sys

from receiver import SettingsError, create_app

try:
    app = create_app()
except SettingsError as error:
    sys.exit(f"twin24-receiver: {error}")
