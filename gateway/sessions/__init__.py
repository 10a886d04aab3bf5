"""The session core: one open session per conversation, each with its own inactivity timer.

    manager.py    SessionManager, the facade the web layer and admin API call
    scheduler.py  per-conversation order: queues, workers, back-pressure, held slots
    turn.py       a message turn (and a bot-initiated message)
    closing.py    the close paths: fire, operator, batch, removed endpoints, close scripts
    timers.py     one lazily re-armed loop handle per open session
    clockwatch.py notices wall-clock steps, so the manager re-arms every timer
    book.py       commits a change and keeps memory (open sessions, counts) in step
    bulk.py       passes over many sessions: restore, takeover, a changed policy, a clock step
    state.py      the in-memory types: conversation slot, work items, counters

Calls go one way: manager -> turn (or bulk) -> closing -> book -> timers (closing also hands
conversations back to the scheduler); the scheduler and the timers only call back through the
callables they were given.
"""

from gateway.sessions.manager import SessionManager
from gateway.sessions.state import OutboxSink

__all__ = ["OutboxSink", "SessionManager"]
