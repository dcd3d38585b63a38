# pyright: basic
# Adapter over tqdm, which ships no type information.
"""A console progress bar usable as a conversion's on_progress callback."""

from types import TracebackType

from tqdm import tqdm


class ConsoleProgress:
    """`with ConsoleProgress("converting") as bar: store.ensure(model_id, bar)`."""

    def __init__(self, description: str) -> None:
        self._description = description
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total, desc=self._description, unit="B", unit_scale=True, leave=True
            )
        self._bar.update(done - self._bar.n)

    def __enter__(self) -> "ConsoleProgress":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
