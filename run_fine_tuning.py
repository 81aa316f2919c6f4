#!/usr/bin/env python
"""Front door of the toolkit (the course's original entry point).

    python run_fine_tuning.py --help
    python run_fine_tuning.py                 # all tasks on the embedded model and sample data
    python run_fine_tuning.py --task train    # one task
"""
from fine_tuning_llms.cli import entry

if __name__ == "__main__":
    entry()
