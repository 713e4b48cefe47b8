"""The FastAPI service around the ml tagger. Importing it builds nothing: see service.main.create_app.

Layers, each importing only those below it (tests/service/test_layering.py): the shared modules
here (config, errors, metrics, security, logthrottle, schemas; they may use ml) < ``store`` <
``serving`` < ``training`` < ``api`` < ``main`` and ``cli``."""
