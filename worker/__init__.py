"""tunequeue worker side: Celery app, tasks, model cache, data, training, generation and scoring."""
