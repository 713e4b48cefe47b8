"""The database: tables, repositories (the only code that commits), sessions and the prediction writer; imports nothing else of service."""
