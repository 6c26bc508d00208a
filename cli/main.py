"""`cxr` entry point. Subcommands import their modules lazily so `cxr db upgrade` never loads TensorFlow."""

from __future__ import annotations

import click


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Eager and lazy command names."""
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import a lazy command on first use."""
        if cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].rsplit(":", 1)
            module = __import__(module_name, fromlist=[attr])
            return getattr(module, attr)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy={
        "db": "cli.admin_cmds:db_group",
        "user": "cli.admin_cmds:user_group",
        "run": "cli.run_cmd:run_command",
        "worker": "cli.run_cmd:worker_command",
        "web": "cli.run_cmd:web_command",
        "reconcile": "cli.run_cmd:reconcile_command",
        "retrain": "cli.retrain_cmd:retrain_command",
        "model": "cli.model_cmds:model_group",
        "predict": "cli.model_cmds:predict_command",
        "dicom-listen": "cli.dicom_cmd:dicom_listen_command",
        "status": "cli.status_cmd:status_command",
    },
)
def main() -> None:
    """Chest X-ray batch screening (research and teaching tool, not a medical device)."""
    import logging

    from config import ConfigError, load_settings
    from ops.logs import setup_from_settings, setup_logging

    # A command's report goes to stdout; log lines to stderr, warnings and up (or a higher CXR_LOG_LEVEL).
    try:
        setup_from_settings(load_settings(), process="cli", min_level=logging.WARNING)
    except ConfigError:
        setup_logging(level=logging.WARNING, process="cli")  # the command itself reports the bad setting
