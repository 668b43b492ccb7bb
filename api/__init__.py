"""The HTTP API of the SimMIM pretraining service (FastAPI, everything under ``/v1``).

Start it with ``uvicorn --factory api.main:app_factory``; build one in code with
``api.main.create_app(settings, dispatcher)``. Never imports torch.
"""
