"""The FastAPI service around the ml tagger. Importing it builds nothing: see service.main.create_app."""
