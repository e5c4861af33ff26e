"""The event the signals probe produces."""

from __future__ import annotations

from typing import ClassVar

import attrs

from deetune.events import Event


@attrs.frozen
class SignalEvent(Event):
    """The kernel generated a signal (``signal/signal_generate``).

    The sender is the task that was running when the signal was generated:
    the caller of kill(2)/tgkill(2)/sigqueue(2), or, for signals the kernel
    raises itself (SIGCHLD, SIGSEGV, SIGPIPE, timers …), whatever task was
    current then.  ``code`` tells them apart (0 = SI_USER: kill(2)).
    """

    type: ClassVar[str] = "signal"
    #: Signal number (10 is SIGUSR1 on x86_64 and arm64).
    sig: int = attrs.field(kw_only=True)
    #: Its name (``"SIGUSR1"``), or ``"SIG<n>"`` for real-time and unknown numbers.
    signame: str = attrs.field(kw_only=True)
    #: Sender: thread-group id ("pid"), thread id, real uid, task name.
    sender_pid: int = attrs.field(kw_only=True)
    sender_tid: int = attrs.field(kw_only=True)
    sender_uid: int = attrs.field(kw_only=True)
    sender_comm: str = attrs.field(kw_only=True)
    #: Target task's pid as the tracepoint reports it (the thread-group leader
    #: for a process-directed signal such as kill(2)), and its task name.
    target_pid: int = attrs.field(kw_only=True)
    target_comm: str = attrs.field(kw_only=True)
    #: True: process-directed (any thread may take it); False: thread-directed.
    group: bool = attrs.field(kw_only=True)
    #: si_code: 0 SI_USER (kill), -6 SI_TKILL (tgkill), -1 SI_QUEUE, 128 SI_KERNEL, CLD_* for SIGCHLD …
    code: int = attrs.field(kw_only=True)
    #: si_errno (almost always 0).
    si_errno: int = attrs.field(kw_only=True, default=0)
    #: ``"delivered"``, ``"ignored"``, ``"already_pending"``, ``"overflow_fail"`` or ``"lose_info"``.
    result: str = attrs.field(kw_only=True)
