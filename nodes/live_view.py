"""Live-view messages to the frontend: training progress and merge reports, over ComfyUI's websocket.

:func:`send` wraps ``server.PromptServer.instance.send_sync`` (thread-safe; ComfyUI imported on first use)
and is a no-op outside a ComfyUI server (tests, tools), so nodes may call it unconditionally. Every message
names the node it belongs to (``node``: the executing node's id, ``display_node``: the id the frontend
shows, which differs only inside expanded groups/subgraphs) and the ``prompt_id``; it goes to the client
that queued the prompt, as ComfyUI's own ``progress`` messages do. The frontend side is
``web/safetydpo_live.js``.

Messages (the event name, then the payload besides ``node`` / ``display_node`` / ``prompt_id``):

* ``safetydpo.train``: ``phase`` ("start", "step" or "done"), ``step``, ``total``, ``category``, and for
  "step" ``loss``, ``implicit_acc``, ``margin`` (floats, null when not finite). "start" is sent before the
  first step (``step``: the step a resumed run continues from, else 0), "step" at most every
  :data:`MIN_INTERVAL` seconds and always for the last step, "done" when the node has its result.
* ``safetydpo.merge``: ``method`` and ``report`` (the merge report's text), when the Co-Merge node finishes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)
TRAIN_EVENT = "safetydpo.train"
MERGE_EVENT = "safetydpo.merge"
MIN_INTERVAL = 0.25  # seconds between two "step" messages of one run (the last step is always sent)


def _server():
    try:
        import server  # ComfyUI's server module; absent outside ComfyUI
    except ImportError:
        return None
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def _context() -> tuple[str | None, str | None]:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    ctx = get_executing_context()
    return (ctx.node_id, ctx.prompt_id) if ctx is not None else (None, None)


def send(event: str, data: Mapping[str, Any], node_id: str | None = None) -> bool:
    """Send ``data`` (a JSON object) as ``event`` to the client that queued the running prompt, tagged with the
    executing node. Returns whether a server took it; never raises (the live view must not break a run)."""
    try:
        srv = _server()
        if srv is None:
            return False
        ctx_node, prompt_id = _context()
        node = node_id if node_id is not None else ctx_node
        if node is None:
            return False
        display = getattr(srv, "last_node_id", None) if node_id is None else None
        payload = {"node": str(node), "display_node": str(display if display is not None else node),
                   "prompt_id": prompt_id, **data}
        srv.send_sync(event, payload, getattr(srv, "client_id", None))
        return True
    except Exception:  # noqa: BLE001 - a display message must never stop training
        log.debug("SafetyDPO live view: could not send %s", event, exc_info=True)
        return False


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def train_progress(total: int, category: str, inner: Callable[..., None] | None = None, start: int = 0,
                   clock: Callable[[], float] = time.monotonic) -> Callable[..., None]:
    """A ``progress(step, total, row)`` callback for the trainer that calls ``inner`` (ComfyUI's progress bar)
    and sends throttled ``safetydpo.train`` "step" messages; "start" is sent now."""
    state = {"last": None}
    send(TRAIN_EVENT, {"phase": "start", "step": int(start), "total": int(total), "category": category})

    def progress(step: int, total_: int | None = None, row: Mapping | None = None, *rest) -> None:
        if inner is not None:
            inner(step, total_, row, *rest)
        n = int(total_ if total_ is not None else total)
        now = clock()
        if state["last"] is not None and now - state["last"] < MIN_INTERVAL and step < n:
            return
        state["last"] = now
        row = row or {}
        send(TRAIN_EVENT, {"phase": "step", "step": int(step), "total": n, "category": category,
                           "loss": _num(row.get("loss")), "implicit_acc": _num(row.get("implicit_acc")),
                           "margin": _num(row.get("margin"))})

    return progress


def train_done(step: int, total: int, category: str) -> None:
    send(TRAIN_EVENT, {"phase": "done", "step": int(step), "total": int(total), "category": category})


def merge_report(method: str, report: str) -> None:
    send(MERGE_EVENT, {"method": method, "report": report})
