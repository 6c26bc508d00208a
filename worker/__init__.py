"""Celery worker: the app and its configuration (app.py, no TensorFlow), the tasks, screening."""
