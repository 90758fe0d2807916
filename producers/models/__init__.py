"""`conveyor models`: the model store from the command line (list, show, prepare), its lifecycle
(compress, evaluate, compare) and aliases (promotion, rollback, history, removal)."""
