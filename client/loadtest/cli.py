"""q8kv-loadtest: a load generator for q8kv that behaves like model runners (in the manner of
ghz). See ``q8kv-loadtest --help`` (the flags and their checks: flags.py); the load itself
is described in run.py.

    q8kv-loadtest 127.0.0.1:50051 --concurrency 16 --duration 30s --prefill 512 --steps 64
    q8kv-loadtest 127.0.0.1:50051 -n 2000 --streaming --verify 0.1 --output json
    q8kv-loadtest 127.0.0.1:50051 -z 30s --packed --batch 64 --in-flight 2 -c 1

Exit status: 0 all calls succeeded and every verified output matched; 1 a call failed, an
output mismatched or the server stopped answering; 2 the run could not start (bad flag,
unreachable target, sessions could not be created); 130 interrupted (Ctrl-C) without
failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from q8kv.client import AsyncClient, Q8KVError

from . import report as report_mod
from .flags import build_parser, check_args
from .run import Orchestrator, delete_sessions
from .state import CallFailed, LoadSpec, Shared
from .stats import Recorder

PROBE_TIMEOUT_S = 5.0

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


class SetupError(Exception):
    """The run could not start; the message says why."""


@dataclass
class Outcome:
    shared: Shared
    duration: float
    interrupted: bool
    server: dict[str, Any] | None
    sessions_left: int


class Runner:
    """One run: probe, set up, load (with the progress bar), clean up."""

    def __init__(self, spec: LoadSpec, metrics_url: str | None, show_progress: bool) -> None:
        self.spec = spec
        self.metrics_url = metrics_url
        self.show_progress = show_progress
        self.shared = Shared(spec, Recorder(spec.seed))
        self.interrupts = 0
        self._cancellable: list[asyncio.Task] = []

    def interrupt(self) -> None:
        """Ctrl-C: stop the load (in-flight calls are cancelled, not counted) and report.
        Another Ctrl-C skips deleting the sessions."""
        self.interrupts += 1
        self.shared.stopped = True
        if self.interrupts == 1:
            print("\nq8kv-loadtest: interrupted; stopping (Ctrl-C again to skip deleting "
                  "the sessions)", file=sys.stderr)
        for task in self._cancellable:
            task.cancel()

    async def _cancellable_run(self, *coros: Any) -> list[Any]:
        """Run ``coros`` as tasks that Ctrl-C cancels; returns their results or exceptions."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        self._cancellable = tasks
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._cancellable = []

    async def _scrape(self) -> tuple[dict[str, float] | None, str | None]:
        if not self.metrics_url:
            return None, None
        try:
            return await asyncio.to_thread(report_mod.scrape, self.metrics_url), None
        except report_mod.MetricsError as exc:
            return None, str(exc)

    async def _probe(self, client: AsyncClient) -> None:
        """Fail fast with a clear message when the target cannot be reached."""
        try:
            await asyncio.wait_for(client.health(), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise SetupError(f"cannot reach {self.spec.target}: no answer within "
                             f"{PROBE_TIMEOUT_S:g}s") from None
        except Q8KVError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:  # no health service: go on
                return
            raise SetupError(f"cannot reach {self.spec.target}: {exc}") from None

    async def run(self) -> Outcome:
        spec, shared = self.spec, self.shared
        tls: Any = True if spec.tls == "system" else spec.tls
        clients = [
            AsyncClient(spec.target, timeout=spec.timeout, token=spec.token, tls=tls,
                        max_message_bytes=spec.max_message_bytes)
            for _ in range(spec.connections)
        ]
        orchestrators = [
            Orchestrator(i, clients[i % len(clients)], shared) for i in range(spec.concurrency)
        ]
        try:
            await self._probe(clients[0])
            before, metrics_error = await self._scrape()
            await self._setup(orchestrators)
            duration = await self._load(orchestrators)
            for o in orchestrators:
                await o.close_stream()
            after, error = await self._scrape()
            server = report_mod.server_section(before, after, error or metrics_error)
            sessions_left = await self._clean_up(clients[0])
            return Outcome(shared, duration, self.interrupts > 0, server, sessions_left)
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _setup(self, orchestrators: list[Orchestrator]) -> None:
        # Untimed prefills go a few at a time: dozens of prompt-sized messages in flight at
        # once only queue on the server, and on a small host they starved the connection
        # until gRPC cancelled every call on it (seen with 64 x 12 MB prefills on 2 cores).
        steps = [("creating sessions", lambda o: o.create(), 64)]
        if self.spec.untimed_prefill and self.spec.prefill:
            steps.append(("prefilling (untimed)", lambda o: o.first_prefill(), 4))
        for what, step, width in steps:
            semaphore = asyncio.Semaphore(width)

            async def limited(o: Orchestrator, step=step, semaphore=semaphore) -> None:
                async with semaphore:
                    await step(o)

            results = await self._cancellable_run(*(limited(o) for o in orchestrators))
            failures = [r for r in results if isinstance(r, BaseException)]
            if self.interrupts:
                return
            if failures:
                first = failures[0]
                first = first.error if isinstance(first, CallFailed) else first
                if not isinstance(first, Q8KVError):
                    raise first
                with contextlib.suppress(Exception):
                    await delete_sessions(orchestrators[0].client, self.shared)
                raise SetupError(f"{what} on {self.spec.target} failed: {first}")

    async def _load(self, orchestrators: list[Orchestrator]) -> float:
        spec, shared = self.spec, self.shared
        shared.t0 = shared.next_slot = time.perf_counter()
        if spec.duration is not None:
            shared.deadline = shared.t0 + spec.duration
        if self.interrupts:
            return 0.0
        skip = spec.untimed_prefill
        ticker = None
        if self.show_progress:
            ticker = asyncio.ensure_future(report_mod.progress(spec, shared))
        try:
            results = await self._cancellable_run(*(o.run(skip) for o in orchestrators))
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        duration = time.perf_counter() - shared.t0
        for r in results:  # a bug in an orchestrator: surface it
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        return duration

    async def _clean_up(self, client: AsyncClient) -> int:
        if self.interrupts > 1:
            return len(self.shared.sessions)
        (left,) = await self._cancellable_run(delete_sessions(client, self.shared))
        return left if isinstance(left, int) else len(self.shared.sessions)


async def _main(spec: LoadSpec, args: argparse.Namespace) -> int:
    show = not args.quiet and sys.stdout.isatty()
    runner = Runner(spec, args.metrics_url, show)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        loop.add_signal_handler(signal.SIGINT, runner.interrupt)
    try:
        outcome = await runner.run()
    except SetupError as exc:
        print(f"q8kv-loadtest: {exc}", file=sys.stderr)
        return EXIT_SETUP
    report = report_mod.build(
        spec, outcome.shared, outcome.duration, interrupted=outcome.interrupted,
        server=outcome.server, sessions_left=outcome.sessions_left,
    )
    rendered = report_mod.render(args.output, report, outcome.shared)
    if args.output_file:
        with open(args.output_file, "w") as f:
            f.write(rendered)
    else:
        sys.stdout.write(rendered)
        sys.stdout.flush()
    if args.plot:
        report_mod.plot(args.plot, report, outcome.shared)
    if report["aborted"]:
        print(f"q8kv-loadtest: {report['aborted']}", file=sys.stderr)
    if report["errors"] or report["mismatches"] or report["aborted"]:
        if report["errors"] and not report["aborted"]:
            print(f"q8kv-loadtest: {report['errors']} of {report['count']} calls failed",
                  file=sys.stderr)
        if report["mismatches"]:
            print(f"q8kv-loadtest: {report['mismatches']} verified outputs mismatched",
                  file=sys.stderr)
        return EXIT_FAILED
    return EXIT_INTERRUPTED if outcome.interrupted else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = check_args(args, parser)
    try:
        return asyncio.run(_main(spec, args))
    except KeyboardInterrupt:  # Ctrl-C before the handler was installed, or after it left
        return EXIT_INTERRUPTED
    except OSError as exc:  # e.g. --output-file in a missing folder
        print(f"q8kv-loadtest: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
