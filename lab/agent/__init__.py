"""The load agent: open-model arrival phases of comet client connections, measured.

``python -m lab.agent --url ws://127.0.0.1:8080/ws?channel=bench --rate 2500
--connections 64000 --hold 60`` ramps, holds, closes and exits 0; stdout carries one
``{"kind": "agent", ...}`` JSON line a second and a last ``{"kind": "agent_end", ...}``
(results/README.md); ``--records FILE.rec`` keeps one row per connection
(``lab.agent.records.read_records``). Modules:

- ``schedule``    pure: phases -> per-connection open/close offsets (uniform or seeded Poisson)
- ``capacity``    pure checks before any connection: files, ports × addresses, memory
- ``target``      a destination URL parsed once, with its prepared first request
- ``session``     the client protocols (websocket, generic, longpoll, sse)
- ``proc``        one load process: its shard of the schedule (the processes open in turn,
                  each a consecutive run, while fewer keep the rate: ``Schedule.lanes``);
                  its sockets in one epoll set (``lab.rawio``), read in ticks (2 ms while
                  the event loop opens or closes, 50 ms in a hold) with kernel receive times
- ``fastpath``    WebSocket sessions' hot path in C (``fastpath.c``, ctypes, built with the
                  host's ``cc`` at first use; ``LAB_AGENT_FASTPATH=0`` turns it off): a
                  launcher thread starts the rows on schedule, and the start, the upgrade and
                  the idle hold cost no Python object; anything else (an unknown response,
                  a message, a close, a timeout) is handed to ``session``'s objects
- ``coordinator`` the parent: capacity, processes, merged stream, records, publisher
- ``publisher``   POST /pub/<channel> at a rate, each body carrying its send time
- ``records``     per-connection columns and the .rec file format

Plan file (``--plan FILE.json``; the controller writes it)::

    {"arrival": "uniform",            optional: uniform | poisson (else --arrival)
     "seed": 0,                       optional: Poisson seed (else --seed)
     "phases": [
       {"kind": "ramp", "rate_per_s": 2500, "until": 15000},   open until 15,000 are open
       {"kind": "ramp", "rate_per_s": 100, "duration_s": 10},  or open for 10 s
       {"kind": "hold", "duration_s": 60},                     open nothing for 60 s
       {"kind": "close", "rate_per_s": 5000},                  close oldest first at a rate,
       {"kind": "close"}                                       or all at once;
     ]}                                                        optional "count": close only N

Connect and delivery latencies end at the kernel's receive time of the read that brought the
101 response or the message (SO_TIMESTAMPNS), so they do not depend on when the agent got the
CPU to read it; ``--read-on-arrival`` reads at each arrival and times by the read instead.
That time is the read's last segment's: a message followed in the same read by later bytes
(another message, when the agent reads less often than they come) has none of its own and
is counted ``untimed`` instead; a 101 read together with later bytes (frames the server sent
right after it) is timed by them.

Times are offsets from the common start (``--start-at``, unix seconds; default: now + 0.5 s).
Connections still open after the last phase close at its end. Several agent hosts each get
their own share (their own rates and ``until``) and the same ``--start-at``.
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m lab.agent`` / ``lab agent`` (see ``lab.agent.coordinator.main``)."""
    from lab.agent.coordinator import main as run

    return run(argv, prog)


__all__ = ["main"]
