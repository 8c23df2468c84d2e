"""`python -m receiver <command>`: the same commands as `flask --app receiver <command>`.

A setting that is missing or malformed stops the command with one line naming it. Asking for help
(`--help`, `<command> --help`) builds no app: no database is created, no token generated.
"""
import copy

import click
from flask.cli import FlaskGroup, with_appcontext

from . import SettingsError, create_app
from .cli import COMMANDS
from .settings import EXIT_BAD_SETTING


class BadSetting(click.ClickException):
    exit_code = EXIT_BAD_SETTING        # systemd's RestartPreventExitStatus: no restart into the same error


def load_app():
    try:
        return create_app()
    except SettingsError as error:
        raise BadSetting(str(error)) from None


class ReceiverGroup(FlaskGroup):
    """FlaskGroup knows an app's commands only by building the app, so `--help` would create the
    database and generate tokens. Here the receiver's commands are the group's own, and the app is
    built when one of them runs, not when it is listed or its help is shown."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for command in COMMANDS:
            self.add_command(_built_when_run(command))

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return sorted(click.Group.list_commands(self, ctx))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load_plugin_commands()
        return click.Group.get_command(self, ctx, name)


def _built_when_run(command: click.Command) -> click.Command:
    """The command, its callback run in the app's context. A group's own callback does nothing and
    runs before its subcommand reads `--help`: its subcommands carry with_appcontext themselves."""
    if isinstance(command, click.Group) or command.callback is None:
        return command
    wrapped = copy.copy(command)
    wrapped.callback = with_appcontext(command.callback)
    return wrapped


cli = ReceiverGroup(name="receiver", create_app=load_app, add_default_commands=True, load_dotenv=False,
                    help="twin24-receiver: TWIN status callbacks in, chat results out.")

if __name__ == "__main__":
    cli()
