"""Step lanes: the driver's direct line to an actor on its own node, for the verbs of a step.

A Ray actor call costs about 1 ms there and back on a 2-core box, idle (`bench/ray_latency.py`),
and more CPU time than that in the two processes' Ray threads. A tiny step makes eight such calls,
three of them one after another on its critical path. A lane is a Unix socket from the driver to one actor, which the
actor serves from a Ray task of its own (`LaneServer.serve_lane`): the task reads a verb and its
arguments, runs the actor's method on the actor's own thread, exactly where a Ray call of that
method would have run, sends back the result, and waits for the next one. The same exchange over
a lane took 0.06-0.2 ms there and back.

Rules, all kept by `workers.group.ActorGroup`, which owns its group's lanes:

- While a lane is open the actor runs nothing else: Ray calls to it wait behind `serve_lane`. So
  the group closes its lanes before it hands out its actors' Ray handles (its `actors` property),
  and opens them again when a step next asks for them. Closing waits for the calls the actor still
  has; their replies stay readable. Lanes only go to actors on the driver's
  node (`cluster.step_lanes`).
- A lane's calls run in the order they were sent and their replies come back in that order, as
  Ray runs an actor's calls from one caller in order.
- A verb that raises comes back as the same `RayTaskError` a Ray call would raise (an instance of
  the verb's own exception type too). An actor that dies closes its socket; the lane then raises
  the error Ray gives for the `serve_lane` task, `RayActorError` for a dead actor, so the driver's
  fault handling (`launch/faults.py`) sees what it would have seen from Ray.
- A read interrupted by an exception in the driver (preemption's deadline) leaves the stream
  between two frames unknown: the lane is marked broken and the group opens a new one next time.

Frames are a pickle (protocol 5) of `(verb, args, kwargs)`, `None` to close, or `(ok, value)` back,
with its out-of-band buffers (numpy arrays) sent after it as they are; they arrive in writable
buffers of their own.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import shutil
import socket
import struct
import tempfile
import traceback
from typing import Any

import ray

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!QI")
_LENGTH = struct.Struct("!Q")
ACCEPT_TIMEOUT_S = 60.0
"""How long `serve_lane` waits for the driver to connect before it gives the actor back to Ray."""
OUT_OF_BAND_BYTES = 1 << 16
"""Buffers this large or larger cross after the pickle instead of being copied into it (below,
one `sendall` for the whole frame is cheaper)."""
LOST_WAIT_S = 60.0
"""How long a lane whose socket closed waits for Ray to say what happened to the actor."""


class LaneError(RuntimeError):
    """A lane closed under a call, while Ray reports the actor alive (or cannot say within
    `LOST_WAIT_S`)."""


def send_frame(sock: socket.socket, obj: Any) -> None:
    """One frame: the header (pickle length, number of out-of-band buffers, each buffer's length),
    the pickle, then the buffers themselves (contiguous numpy arrays and tensors' storages cross
    without a copy into the pickle)."""
    raws: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:  # False: this buffer goes after the pickle
        raw = buffer.raw()
        if raw.nbytes < OUT_OF_BAND_BYTES:
            return True
        raws.append(raw)
        return False

    data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    header = _HEADER.pack(len(data), len(raws)) + b"".join(_LENGTH.pack(r.nbytes) for r in raws)
    if not raws:
        sock.sendall(header + data)
        return
    sock.sendall(header)
    sock.sendall(data)
    for raw in raws:
        sock.sendall(raw)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("the lane's peer closed it")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> Any:
    n, count = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    sizes = _recv_exact(sock, _LENGTH.size * count)
    lengths = [_LENGTH.unpack_from(sizes, _LENGTH.size * j)[0] for j in range(count)]
    data = _recv_exact(sock, n)
    return pickle.loads(data, buffers=[_recv_exact(sock, m) for m in lengths])


def _error_reply(verb: str, error: BaseException) -> tuple[bool, Any]:
    """What the driver needs to raise a verb's error as Ray would: (False, (verb, traceback, cause))."""
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        pickle.dumps(error, protocol=5)
        cause: BaseException = error
    except Exception:  # an exception that does not pickle travels as its text
        cause = RuntimeError(f"{type(error).__name__}: {error}")
    return False, (verb, tb, cause)


class LaneServer:
    """Mixed into an actor class: the two Ray verbs that open and serve a lane."""

    def open_lane(self) -> str:
        """Listen on a new Unix socket; returns its path (the driver connects to it)."""
        folder = tempfile.mkdtemp(prefix="prime-lane-")
        path = os.path.join(folder, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self._lane_listener = (listener, folder)
        return path

    def serve_lane(self) -> int:
        """Run the verbs that arrive on the lane `open_lane` made, one after another, until the
        driver closes it (or goes away); returns how many ran."""
        listener, folder = self._lane_listener
        self._lane_listener = None
        try:
            listener.settimeout(ACCEPT_TIMEOUT_S)
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                return 0
        finally:
            listener.close()
            shutil.rmtree(folder, ignore_errors=True)
        served = 0
        with conn:
            conn.settimeout(None)
            while True:
                try:
                    msg = recv_frame(conn)
                except (EOFError, OSError):
                    return served
                if msg is None:
                    return served
                verb, args, kwargs = msg
                try:
                    reply: tuple[bool, Any] = (True, getattr(self, verb)(*args, **kwargs))
                except Exception as e:
                    reply = _error_reply(verb, e)
                try:
                    send_frame(conn, reply)
                except (pickle.PicklingError, TypeError, AttributeError) as e:  # a result that does not pickle
                    send_frame(conn, _error_reply(verb, e))
                except OSError:
                    return served
                served += 1


class Lane:
    """The driver's end of one actor's lane (`open_lanes` makes them)."""

    def __init__(self, label: str, path: str, serving: Any) -> None:
        self.label, self._serving = label, serving
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self.pending = 0
        """Calls sent whose replies `result` has not returned yet."""
        self.broken = False
        self._closed = False
        self._kept: collections.deque = collections.deque()  # replies read by `close`, for `result`

    def fileno(self) -> int:
        return self._sock.fileno()

    def submit(self, verb: str, *args: Any, **kwargs: Any) -> None:
        """Send a call of the actor's method `verb`; its reply is read by `result`, in order."""
        if self._closed:
            raise LaneError(f"lane to {self.label} is closed")
        try:
            send_frame(self._sock, (verb, args, kwargs))
        except OSError as e:
            raise self._loss(e) from e
        except BaseException:
            self.broken = True
            raise
        self.pending += 1

    def result(self) -> Any:
        """The reply to the oldest call whose reply has not been returned: its value, or its error
        raised as Ray would raise it. Replies of calls that were running when the lane closed are
        still returned."""
        if self.pending <= 0:
            raise LaneError(f"lane to {self.label}: no call is waiting for a reply")
        if self._kept:
            reply = self._kept.popleft()
        elif self._closed:
            raise LaneError(f"lane to {self.label} closed before the reply of a call came back")
        else:
            reply = self._read()
        self.pending -= 1
        if isinstance(reply, BaseException):
            raise reply
        ok, value = reply
        if ok:
            return value
        verb, tb, cause = value
        raise ray.exceptions.RayTaskError(f"{self.label}.{verb}", tb, cause).as_instanceof_cause()

    def _read(self) -> Any:
        """The next reply frame, or (the actor gone) the error to raise for it."""
        try:
            return recv_frame(self._sock)
        except socket.timeout:  # `close`'s wait ran out: the actor may still be in the call
            self.broken = True
            raise
        except (EOFError, OSError) as e:
            loss = self._loss(e)
            loss.__cause__ = e
            return loss
        except BaseException:  # interrupted inside a frame: the stream's position is unknown
            self.broken = True
            raise

    def _loss(self, error: BaseException) -> BaseException:
        """The socket closed under a call: what Ray says of the actor (`RayActorError` when it died)."""
        self.broken = True
        try:
            ray.get(self._serving, timeout=LOST_WAIT_S)
        except ray.exceptions.GetTimeoutError:
            pass
        except ray.exceptions.RayError as lost:
            return lost
        return LaneError(f"lane to {self.label} closed ({type(error).__name__}: {error}) while Ray reports the "
                         f"actor alive")

    def close(self, timeout_s: float = 60.0) -> None:
        """End the lane: the actor finishes the calls it has (their replies stay readable by
        `result`, waited for up to `timeout_s`), then goes back to Ray's queue."""
        if self._closed:
            return
        self._closed = True
        if not self.broken:
            self._sock.settimeout(timeout_s)
            try:
                while len(self._kept) < self.pending and not self.broken:
                    self._kept.append(self._read())
                    if isinstance(self._kept[-1], BaseException):
                        break
                send_frame(self._sock, None)
            except OSError as e:  # socket.timeout included
                log.debug("lane to %s did not end cleanly: %s", self.label, e)
        self._sock.close()
        try:
            ray.get(self._serving, timeout=timeout_s)
        except Exception as e:  # a dead actor's lane needs no clean end
            log.debug("lane to %s ended with %s", self.label, e)


def open_lanes(actors: list[Any], name: str) -> list[Lane]:
    """One lane per actor of a group, opened together."""
    paths = ray.get([a.open_lane.remote() for a in actors])
    serving = [a.serve_lane.remote() for a in actors]
    return [Lane(f"{name}[{i}]", p, s) for i, (p, s) in enumerate(zip(paths, serving))]


def lane_results(group: Any, lanes: list[Lane]) -> list[Any]:
    """The next reply of each of `group`'s lanes, in order. On an error the group's lanes are closed
    first, so that no reply left unread is later taken for another call's."""
    try:
        return [lane.result() for lane in lanes]
    except BaseException:
        group.close_lanes(timeout_s=5.0)  # a rank stuck beside a dead peer would not end its lane
        raise
