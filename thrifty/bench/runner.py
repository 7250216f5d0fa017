"""Run episode jobs in-process or as Ray tasks, appending each result as soon as it finishes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from thrifty.bench.results import Job, ResultsFile

__all__ = ["run_jobs", "ensure_ray"]

EpisodeFn = Callable[[Job], Mapping[str, Any]]


def _run_episode(episode_fn: EpisodeFn, job: Job) -> dict[str, Any]:
    """Body of one Ray task (top level, so workers import it by name)."""
    result = episode_fn(job)
    if not isinstance(result, Mapping):
        raise TypeError(f"episode_fn returned {type(result).__name__}, expected a dict")
    return dict(result)


@contextlib.contextmanager
def _package_on_pythonpath() -> Iterator[None]:
    """Temporarily put the directory holding ``thrifty`` on PYTHONPATH.

    A local Ray cluster's workers inherit the driver's environment, so they can import
    ``thrifty`` (and this module) even when it is not installed and the driver's working
    directory is elsewhere.
    """
    import thrifty

    root = os.path.dirname(os.path.dirname(os.path.abspath(thrifty.__file__)))
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    if root in parts:
        yield
        return
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def ensure_ray(ray_address: str | None = None) -> None:
    """Initialise Ray unless it already is.

    ``ray_address=None`` starts a private local cluster with ``os.cpu_count()`` CPUs
    (``address="local"``, so a ``RAY_ADDRESS`` in the environment or a cluster started
    with ``ray start`` is not picked up by accident); otherwise it is passed to
    ``ray.init(address=...)`` (e.g. ``"auto"`` or ``"host:6379"``), and ``thrifty`` must be
    importable on that cluster's workers. No dashboard. Ray 2.60 turns on token
    authentication for new local clusters by default and creates ``~/.ray/auth_token``
    itself; this needs no network and no interaction, so ``RAY_AUTH_MODE`` is left alone.
    Workers of ``num_cpus=1`` tasks get ``OMP_NUM_THREADS=1`` from Ray (so one torch thread)
    unless the episode function calls ``torch.set_num_threads`` itself.
    """
    import ray

    if ray.is_initialized():
        return
    if ray_address is None:
        with _package_on_pythonpath():
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    else:
        ray.init(address=ray_address)


def _progress(enabled: bool, description: str, total: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
    task_id = progress.add_task(description, total=total)
    return progress, task_id


def run_jobs(
    jobs: Sequence[Job],
    episode_fn: EpisodeFn,
    results: ResultsFile,
    *,
    use_ray: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the jobs not yet in ``results`` and append each result as soon as it finishes.

    ``episode_fn(job) -> dict`` must be picklable for Ray (a top-level function or a
    ``functools.partial`` of one); with Ray each job is one ``num_cpus=1`` task and results
    are appended in completion order. If an episode raises (or on Ctrl-C), results that
    already finished are kept, outstanding Ray tasks are cancelled and the exception
    propagates; rerunning resumes after the finished episodes.

    Returns the episode records (as stored in the file, including the ones skipped because
    they were already done) in job order.
    """
    jobs = list(jobs)
    seen: set[tuple[Any, ...]] = set()
    for job in jobs:
        if job.suite != results.suite:
            raise ValueError(f"job {job} is not of suite {results.suite!r}")
        if job.key in seen:
            raise ValueError(f"two jobs share the key (config, level, seed) = {job.key}")
        seen.add(job.key)

    done = results.done_keys()
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in results.episodes():
        by_key[(rec.get("config"), rec.get("level"), rec.get("seed"))] = rec
    todo = [job for job in jobs if job.key not in done]

    skipped = len(jobs) - len(todo)
    desc = results.suite + (f" (resuming, {skipped} done)" if skipped else "")
    bar, task_id = _progress(progress, desc, len(todo))
    with bar:
        if todo and use_ray:
            _run_ray(todo, episode_fn, results, by_key, ray_address, lambda: bar.advance(task_id))
        else:
            for job in todo:
                by_key[job.key] = results.append(job, _run_episode(episode_fn, job))
                bar.advance(task_id)
    return [by_key[job.key] for job in jobs]


def _run_ray(
    todo: list[Job],
    episode_fn: EpisodeFn,
    results: ResultsFile,
    by_key: dict[tuple[Any, ...], dict[str, Any]],
    ray_address: str | None,
    advance: Callable[[], None],
) -> None:
    import ray

    ensure_ray(ray_address)
    remote = ray.remote(num_cpus=1)(_run_episode)
    fn_ref = ray.put(episode_fn)
    job_of = {}
    for job in todo:
        job_of[remote.options(name=f"{job.suite}:{job.config}:{job.level}:{job.seed}").remote(fn_ref, job)] = job
    pending = list(job_of)

    def collect(ready: list) -> None:
        # Append every successful result of the batch before re-raising a failure.
        error: BaseException | None = None
        for ref in ready:
            job = job_of[ref]
            try:
                result = ray.get(ref)
            except Exception as exc:
                error = error or exc
                continue
            by_key[job.key] = results.append(job, result)
            advance()
        if error is not None:
            raise error

    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            if pending:  # pick up everything else that is already finished
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            collect(ready)
    except BaseException:
        # Keep whatever else already finished successfully, then stop the rest.
        with contextlib.suppress(Exception):
            if pending:
                finished, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                collect(finished)
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        raise
