"""Training progress: a rich bar with loss and images/s on the main process, silence elsewhere."""
from __future__ import annotations

import time


class Progress:
    """``with Progress(total_steps, enabled) as p: ... p.step(loss, images)``; ``p.epoch_done(...)``."""

    def __init__(self, total_steps: int, done_steps: int = 0, enabled: bool = True, description: str = "train"):
        self.enabled, self.description = enabled, description
        self.total, self.done = total_steps, done_steps
        self._bar = None
        self._t0 = time.perf_counter()
        self._images = 0

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done,
                                            loss="-", speed="-", note="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def step(self, loss: float, images: int, note: str = "") -> None:
        """One optimizer step over ``images`` images (all processes together); ``note`` shows after the bar."""
        self._images += images
        if self._bar is not None:
            speed = self._images / max(1e-9, time.perf_counter() - self._t0)
            self._bar.update(self._task, advance=1, loss=f"{loss:.4f}", speed=f"{speed:.0f}", note=note)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def log(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)

    @property
    def images_per_second(self) -> float:
        return self._images / max(1e-9, time.perf_counter() - self._t0)
