"""`conveyor status`: what runs and what waits, from Redis alone (``snapshot``), shown for a person
(``view``, Rich) or as JSON (``snapshot.as_json``, the layout scripts already read)."""
