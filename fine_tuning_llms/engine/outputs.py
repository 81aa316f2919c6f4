"""What a task writes, declared next to its ``run()``; the report reads these declarations only.

A lesson that writes files ends with ``OUTPUTS = TaskOutputs(...)``: its file names and the
function that shows them as its report section (built with ``engine/report_html.py``). The front
door (``cli.task_outputs``) gathers the declarations and passes them to ``report.build_report``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def no_lines(folder: Path) -> list[str]:
    return []


@dataclass(frozen=True)
class TaskOutputs:
    task: str                        # the --task name
    section_id: str                  # html id of its report section
    title: str                       # the section's heading, Korean / English
    files: tuple[str, ...]           # paths under --output_dir; the task has run when any of them exists
    section: Callable[[Path], str]   # the section's HTML, read from those files
    # One-line results for the overview ("at a glance"); reads quietly: a bad file shows in the section.
    glance: Callable[[Path], list[str]] = no_lines
    # (settings, package versions) the run recorded, for the overview; None when it records neither.
    recorded: Callable[[Path], tuple[dict, dict]] | None = None
    # An extra step (export): the report shows its section when it ran and never lists it as "not run".
    optional: bool = False

    def ran(self, folder: Path) -> bool:
        return any((Path(folder) / name).is_file() for name in self.files)
