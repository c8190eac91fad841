"""Several worker processes on one listening socket: the master that starts and supervises them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import select
import signal
import sys
import time
from typing import Any

from enforcer.config import issues
from enforcer.config import settings as settings_mod
from enforcer.http import tls as listener
from enforcer.metrics import enable_multiprocess, process_gone
from enforcer.run.daemon import DRAIN_SECONDS, RELOAD_SIBLINGS, WORKERS_STATE, Daemon, _run_loop
from enforcer.run.systemd import sd_notify, watchdog_interval

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# several worker processes


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the master dies, so no orphan keeps serving unsupervised."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class Master:
    """``listen.workers`` > 1: fork the serving processes, watch them, restart the ones that
    die, forward signals, and speak to systemd for all of them.

    Made before the first fork, so every worker shares them: one listening socket per worker
    on the same port (SO_REUSEPORT, the kernel spreads new connections), and the TLS dispatch
    context (its session-ticket keys, so a ticket from one worker resumes on another). The
    master keeps its copies of the sockets: connections queued for a worker that died wait
    for its replacement instead of being reset. The master runs no event loop and no thread
    (forking is then safe at any time); worker 0 (``primary``) also owns the redirect, the
    admin listener (whose /metrics adds up all workers) and session housekeeping. Sessions,
    their revocations and pending logins are shared through the SQLite store.

    Start-up fails as a whole if a worker exits before it listens (a bad config, a busy port);
    later a dead worker is replaced after a back-off (0.5 s doubling to 30 s, reset once it
    has run a minute). SIGTERM/SIGINT stop every worker (each drains) and exit 0; SIGHUP is
    forwarded (flow-log reopen + reload); the systemd watchdog is fed only while every worker
    reports in.
    """

    HEARTBEAT = 1.0

    def __init__(self, settings: settings_mod.Settings) -> None:
        self.settings = settings
        self.count = settings.model.listen.workers
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.pipes: dict[int, int] = {}  # read end -> worker index
        self.ready: set[int] = set()
        self.beats: dict[int, float] = {}
        self.started: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.respawn_at: dict[int, float] = {}
        self.exit_code = 0
        self.serving = False  # every worker has listened once: from now on dead ones are replaced
        self.discovered: set[int] = set()  # workers whose identity providers are all discovered
        self._published: dict[str, Any] | None = None
        self._signals: list[int] = []

    def run(self) -> int:
        s = self.settings.model
        s.stateDir.mkdir(parents=True, exist_ok=True, mode=0o700)
        enable_multiprocess(s.stateDir / "metrics")
        self.context = listener.dispatch_context()
        gc.collect()
        gc.freeze()  # the imports and settings stay shared with the workers instead of being copied
        self.sockets = [
            listener.make_listen_socket(s.listen.address, s.listen.port, reuse_port=True) for _ in range(self.count)
        ]
        wake_r, wake_w = self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(wake_w)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, RELOAD_SIBLINGS)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            for index in range(self.count):
                self._spawn(index)
            return self._supervise(wake_r)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            for fd in (wake_r, wake_w, *self.pipes):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sock in self.sockets:
                sock.close()
            (s.stateDir / WORKERS_STATE).unlink(missing_ok=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _spawn(self, index: int) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                code = self._worker(index, write_fd)
            except issues.ConfigError as exc:
                print(f"enforcer: configuration error ({len(exc.issues)} problem(s)):", file=sys.stderr)
                for issue in exc.issues:
                    print(f"  {issue}", file=sys.stderr)
                code = 2
            except BaseException:  # report, and leave without running the master's clean-up
                log.exception("worker %d failed", index)
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                    logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.pids[pid] = index
        self.pipes[read_fd] = index
        self.started[index] = time.monotonic()
        self.beats[index] = time.monotonic()
        log.info("started worker %d (pid %d)", index, pid)
        self._publish()

    def _worker(self, index: int, write_fd: int) -> int:
        master = os.getppid()
        _die_with_parent()
        if os.getppid() != master:  # the master died before prctl took effect
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGHUP, RELOAD_SIBLINGS):  # a reload (logrotate) while starting must not kill it
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        for fd in self._wake:
            os.close(fd)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # only the master speaks to systemd
            os.environ.pop(key, None)
        for i, sock in enumerate(self.sockets):
            if i != index:
                sock.close()
        for fd in self.pipes:
            os.close(fd)
        daemon = Daemon(
            self.settings, role="primary" if index == 0 else "worker",
            listen_socket=self.sockets[index], tls_context=self.context,
        )

        async def serve() -> int:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(daemon.run(on_ready=ready))
            await asyncio.wait((task, ready), return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                beat = asyncio.create_task(self._heartbeat(write_fd, daemon))
                try:
                    return await task
                finally:
                    beat.cancel()
            return await task

        return _run_loop(serve())

    async def _heartbeat(self, write_fd: int, daemon: Daemon) -> None:
        """Tell the master we listen ("R"), then that the event loop still turns ("H"/"D":
        discovery done)."""
        os.set_blocking(write_fd, False)
        message = b"R"
        while True:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(write_fd, message)
            message = b"D" if daemon.ready else b"H"
            await asyncio.sleep(self.HEARTBEAT)

    def _supervise(self, wake_r: int) -> int:
        stopping = False
        stop_deadline = 0.0
        watchdog = watchdog_interval()
        next_watchdog = time.monotonic()
        while True:
            try:
                readable, _, _ = select.select([wake_r, *self.pipes], [], [], 0.5)
            except InterruptedError:
                readable = []
            now = time.monotonic()
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
            for fd in readable:
                if fd in self.pipes:
                    self._read_pipe(fd, now)
            signals, self._signals = self._signals, []
            for sig in signals:
                if sig in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    stop_deadline = now + DRAIN_SECONDS + 10
                    sd_notify("STOPPING=1\nSTATUS=draining")
                    log.info("stopping %d worker(s)", len(self.pids))
                    self._kill_all(signal.SIGTERM)
                elif sig in (signal.SIGHUP, RELOAD_SIBLINGS) and not stopping:
                    self._kill_all(sig)
            failed_start = self._reap(stopping, now)
            if failed_start is not None and not stopping:
                log.error("worker failed to start (exit %d): stopping", failed_start)
                self.exit_code = failed_start or 1
                stopping = True
                stop_deadline = now + DRAIN_SECONDS + 10
                self._kill_all(signal.SIGTERM)
            if stopping:
                if not self.pids:
                    return self.exit_code
                if now > stop_deadline:
                    log.error("workers did not stop in time: killing them")
                    self._kill_all(signal.SIGKILL)
                    stop_deadline = now + 5
                continue
            for index, when in list(self.respawn_at.items()):
                if now >= when:
                    del self.respawn_at[index]
                    self._spawn(index)
            if not self.serving and len(self.ready) == self.count:
                self.serving = True
                sd_notify(f"READY=1\nSTATUS={self.count} workers serving")
                log.info("all %d workers are listening", self.count)
            if watchdog is not None and self.serving and now >= next_watchdog:
                stale = [i for i, t in self.beats.items() if now - t > 2 * watchdog and i not in self.respawn_at]
                if not stale:
                    sd_notify("WATCHDOG=1")
                else:
                    log.warning("worker(s) %s stopped reporting: not feeding the watchdog", stale)
                next_watchdog = now + watchdog

    def _read_pipe(self, fd: int, now: float) -> None:
        index = self.pipes[fd]
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        if not data:  # the worker closed its end: it is exiting; _reap handles it
            del self.pipes[fd]
            os.close(fd)
            return
        self.beats[index] = now
        if b"R" in data:
            self.ready.add(index)
        if b"D" in data:
            self.discovered.add(index)
        self._publish()

    def _publish(self) -> None:
        """Write ``workers.json`` in the state dir when the workers' state changed: the
        primary's ``/readyz`` reads it, so a probe sees every worker, not only worker 0."""
        state = {
            "master": os.getpid(),
            "workers": self.count,
            "listening": sorted(self.ready),
            "ready": sorted(self.ready & self.discovered),
            "pids": {str(i): pid for pid, i in sorted(self.pids.items(), key=lambda item: item[1])},
        }
        if state == self._published:
            return
        self._published = state
        path = self.settings.model.stateDir / WORKERS_STATE
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self, stopping: bool, now: float) -> int | None:
        """Collect exited workers; schedule replacements. Returns an exit code if one died
        before it ever listened during start-up."""
        failed: int | None = None
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            process_gone(pid)
            for fd, i in list(self.pipes.items()):
                if i == index:
                    del self.pipes[fd]
                    os.close(fd)
            if stopping:
                log.info("worker %d (pid %d) exited (%d)", index, pid, code)
                if code not in (0, -signal.SIGTERM):
                    self.exit_code = self.exit_code or 1
                continue
            self.ready.discard(index)
            self.discovered.discard(index)
            self._publish()
            if not self.serving:  # still starting up: a worker that cannot start fails the start
                failed = code if code > 0 else 1
                continue
            ran = now - self.started.get(index, now)
            delay = 0.5 if ran > 60 else min(30.0, self.backoff.get(index, 0.25) * 2)
            self.backoff[index] = delay
            self.respawn_at[index] = now + delay
            log.error("worker %d (pid %d) exited unexpectedly (%d); restarting it in %.1f s", index, pid, code, delay)
        return failed

