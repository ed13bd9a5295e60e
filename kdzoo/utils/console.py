"""Terminal output shared by the commands: a rich console and progress bar."""

__all__ = ['console', 'ProgressBar']


def console():
    """A rich console; wide when writing to a file or a CI log."""
    from rich.console import Console
    out = Console()
    return out if out.is_terminal else Console(width=200)


class ProgressBar:
    """A rich progress bar on terminals, silent elsewhere (``description``
    empty or ``None``: silent)."""

    def __init__(self, description, total):
        from rich.console import Console
        from rich.progress import Progress
        err = Console(stderr=True)
        self.bar = Progress(console=err,
                            disable=not (description and err.is_terminal))
        self.task = self.bar.add_task(description or '', total=total)
        self.bar.start()

    def advance(self):
        self.bar.update(self.task, advance=1)

    def stop(self):
        self.bar.stop()
