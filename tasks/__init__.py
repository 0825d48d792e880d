"""One module per pipeline stage: a plain `run` function plus its Prefect task."""

from collections.abc import Callable
from typing import Any


def lazy_task(module_globals: dict[str, Any], stage: str, build: Callable[[], Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds ``<stage>_task`` on first use and keeps it.

    ``wanwu stage <stage>`` (what dvc.yaml calls) then never pays for importing Prefect; the flows get the task.
    """
    name = f"{stage}_task"

    def __getattr__(attr: str) -> Any:
        if attr == name:
            module_globals[name] = task = build()
            return task
        raise AttributeError(attr)

    return __getattr__
