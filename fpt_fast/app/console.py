"""What the commands show while they run: the log callable and the progress bars."""
from __future__ import annotations

from typing import Callable, Optional

Log = Callable[[str], None]  # takes one message (print by default; quiet on the processes that do not log)


def quiet(_: str) -> None:
    """A Log that shows nothing (every torchrun process but rank 0)."""


class Progress:
    """A progress bar (tqdm) counting up to total, or nothing: when disabled, or when tqdm cannot
    be imported (it is a dependency; a broken install still runs, without bars)."""

    def __init__(self, enabled: bool, description: str, total: Optional[int] = None, unit: str = "it"):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False)

    @property
    def shown(self) -> bool:
        """Whether a bar is on the screen (values for show() are worth computing)."""
        return self._bar is not None

    def update(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def show(self, **values: str) -> None:
        """Values shown after the bar, e.g. show(loss="0.1234")."""
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
