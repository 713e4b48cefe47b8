"""One module per resource: translate HTTP to a call of the serving or training layer and back; no module imports another."""
