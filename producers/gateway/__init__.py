"""The HTTP gateway: Conveyor's jobs for systems that cannot speak Celery or Python.

- ``app.py``: the FastAPI application (``POST /v1/jobs/{type}``, ``GET /v1/jobs/{id}``, ``/wait``,
  ``DELETE``), one route per job kind of the registry, published through the SDK's ``Client``.
- ``keys.py``: API keys (``Authorization: Bearer KEY``), stored hashed in Redis, scoped to a
  tenant and to job types. ``ratelimit.py``: each key's request rate. ``body.py``: bounded reads.
- ``webhooks.py``: signed, retried callbacks to allow-listed hosts once a job is done.
- ``views.py``: what the API answers (pydantic models). ``cli.py``: `conveyor gateway` and `conveyor keys`.
"""
