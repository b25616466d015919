"""``medxfer serve RUN``: an HTTP inference server for a trained run, with a page for people.

Usage::

    medxfer serve runs/breast                               # http://127.0.0.1:8000/
    medxfer serve runs/breast --host 0.0.0.0 --api-key-file key.txt --engine onnx
    curl -F files=@scan.png 'http://127.0.0.1:8000/v1/predict?explain=true'

Routes: ``GET /`` (drop an image: predicted class, probability bars, Grad-CAM), ``GET /healthz``,
``GET /v1/model`` (labels, input contract, test metrics with CIs, model card, model id) and
``POST /v1/predict`` (multipart field ``files``; calibrated probabilities and the class at the run's
validation-chosen threshold). Images of concurrent requests are batched into one model call
(:mod:`medxfer.serve.batching`). Only :mod:`medxfer.serve.model` calls medxfer's internals.

Why Starlette + uvicorn rather than FastAPI: the API is four routes whose inputs are multipart
uploads and whose validation is medxfer's own (readers, pixel limits, error JSON); FastAPI's
pydantic models and generated docs would add a layer without checking anything more, and its
``/docs`` page loads its script from a CDN, which this server's "no remote resources" rule
forbids. Starlette is the ASGI toolkit FastAPI is built on (same request, upload and middleware
code), with two small dependencies (``starlette``, ``python-multipart``); uvicorn is the server.
"""

from medxfer.serve.app import ServeConfig, create_app, run

__all__ = ["ServeConfig", "create_app", "run"]
