"""The live experiment dashboard: one page, served by the controller, pushed over Server-Sent Events.

* `cohortgate.dashboard.view`  -- pure: a `Recorder` of per-second request/denial counts, and `view`,
  which turns the controller's status document, the audit log and those counts into what the page
  draws (no I/O, tested without a loop);
* `cohortgate.dashboard.app`    -- the aiohttp adapter: the page and its assets (package data under
  ``static/``), ``/api/state``, the ``/api/events`` stream, and -- only with ``--allow-actions`` --
  the action endpoints, which reuse the controller API's handler so an action is audited exactly
  like ``cohortgate rollback``.
"""
