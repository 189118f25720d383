"""Which programs XLA compiled, and for how long, while a block ran (jax.monitoring's
backend-compile events, one per compilation that reaches the backend; persistent-cache hits
included, tracing-cache hits not). Benchmarks check that a timed region compiled nothing;
tests check one compile per shape.

    with CompileLog() as log:
        run()
    log.seconds, log.names("_segment")
"""

from __future__ import annotations

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileLog:
    """Records (function name, seconds) of every backend compile while the block runs."""

    def __init__(self) -> None:
        self.compiles: list[tuple[str, float]] = []

    def _listen(self, event: str, duration: float, fun_name: str = "", **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.compiles.append((fun_name, duration))

    @property
    def seconds(self) -> float:
        return sum(d for _, d in self.compiles)

    def names(self, part: str = "") -> list[str]:
        """The compiled programs' names ("jit(f)") that contain ``part``, in order."""
        return [n for n, _ in self.compiles if part in n]

    def __enter__(self) -> CompileLog:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
