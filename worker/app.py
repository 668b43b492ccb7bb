"""``celery -A worker.app worker``: the one module that reads the environment (``SIMMIM_*``).

Importing it builds the app from ``Settings()`` at worker start; everything else takes
its settings as an argument, so tests and other processes build their own app.
"""

from simmim_service.settings import Settings
from worker.celery_app import make_celery

app = make_celery(Settings())
