"""`python -m receiver <command>`: the same commands as `flask --app receiver <command>`.

A setting that is missing or malformed stops the command with one line naming it.
"""
import click
from flask.cli import FlaskGroup

from . import SettingsError, create_app
from .settings import EXIT_BAD_SETTING


class BadSetting(click.ClickException):
    exit_code = EXIT_BAD_SETTING        # systemd's RestartPreventExitStatus: no restart into the same error


def load_app():
    try:
        return create_app()
    except SettingsError as error:
        raise BadSetting(str(error)) from None


cli = FlaskGroup(name="receiver", create_app=load_app, add_default_commands=True, load_dotenv=False,
                 help="twin24-receiver: TWIN status callbacks in, chat results out.")

if __name__ == "__main__":
    cli()
