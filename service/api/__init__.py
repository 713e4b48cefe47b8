"""HTTP only: routes, dependencies, error handlers, middleware and the OpenAPI document; routes call serving and training, never store."""
