"""HTTP layer: routes, request/response schemas, error mapping, upload reading."""
