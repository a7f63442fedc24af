"""The web face: a FastAPI app (page + JSON API) that captions uploaded photos, with request batching."""
