"""How messages travel: the Celery app and its queues, the Redis stream names agencies write to and
read from, result publication, and the submission client."""
