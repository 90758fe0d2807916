"""Per-kind evaluations (``workers.evaluation.Evaluation``), named by each kind's ``KindSpec.evaluation``."""
