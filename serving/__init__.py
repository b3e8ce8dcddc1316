"""Online serving: feature vectors from Feast's Redis layout, predictions, model registry, HTTP API.

serving.app.run(settings) starts the server `freshet serve` runs.
"""
