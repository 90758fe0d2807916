"""Bulk offline scoring: a file of rows through the same workers, in chunks on the bulk
queues, resumable, assembled in input order. ``conveyor score`` and ``Client.score``.

- ``kinds``: per job type, how rows are checked, chunked into jobs and turned into columns.
- ``state``: the manifest and journal beside the output that make a run resumable.
- ``broker``: publishing chunks, collecting results, finding chunks Redis lost.
- ``run``: one run, start to output, and ``ScoreHandle`` for a run in the background.
- ``cli``: the ``conveyor score`` commands.

Nothing here is imported by ``import producers.score`` itself, so the CLI starts without pyarrow.
"""
