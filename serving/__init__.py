"""Online serving: feature vectors from Feast's Redis layout, predictions, model registry, HTTP API.

freshet.serving.workers.run(settings) starts the server `freshet serve` runs.
"""
