"""Reports: metrics -> markdown tables and PNG plots a person can read at a glance."""

from mmpeft.report.run_report import write_run_report

__all__ = ["write_run_report"]
