"""Access control on the producer side: tenants' submit claims and quotas (``gate``), the Redis ACL
roles (``roles``) and the `conveyor users` command that creates their users (``cli``).

Enforcement lives in Redis, not here: a producer's Redis user may write only its own tenant's
keys, and workers refuse a tenant's job that has no claim (workers/tenancy.py). This package is
what an honest client does so that its jobs pass."""
