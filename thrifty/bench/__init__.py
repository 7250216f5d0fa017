"""Benchmarks: suites, the runner (in-process or Ray), results files, tables and Pareto plots."""

from thrifty.bench.report import pareto_plot, print_table, summarize, wilson_interval, write_summary_json
from thrifty.bench.results import Job, ResultsFile, ResultsMismatchError
from thrifty.bench.runner import run_jobs
from thrifty.bench.suites import SHIPPED_PLANNER, SUITES, BenchConfig, Suite, UnknownSuiteError, episode_fn, get_suite

__all__ = ["pareto_plot", "print_table", "summarize", "wilson_interval", "write_summary_json", "Job", "ResultsFile",
           "ResultsMismatchError", "run_jobs", "SHIPPED_PLANNER", "SUITES", "BenchConfig", "Suite",
           "UnknownSuiteError", "episode_fn", "get_suite"]
