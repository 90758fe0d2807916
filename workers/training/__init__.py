"""Training jobs run on a training worker: recommenders (``recommender.train_recommender``) and
text-classifier fine-tuning (``finetune.fine_tune``). Both read and check their data first
(``data``), checkpoint every epoch (``checkpoint``), and publish a new version to the model store."""
